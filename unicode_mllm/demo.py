"""The README's main job: the whole pipeline on the embedded tiny preset, ending in `report/`.

Stages run in order, each from the repository's YAML presets (`configs/`) with the profile's
overrides, and each adds its figures to the report:

1. data: the shapes world as webdataset shards (+ a sample grid) and the analyser check;
2. stage 0: the tiny text tokenizer + LLaMA pre-trained on the shapes text;
3. stage 1: the visual tokenizer whose codebook is that LLaMA's embedding table;
4. stage 2: the LLaMA fine-tuned to read and write images (`configs/mllm/tiny.yaml`);
5. evaluation: reconstruction (PSNR/SSIM on val, heldout and out-of-domain photos), held-out VQA
   with greedy decoding, text-to-image scored by the shapes analyser on seen and held-out pairs.

The stages and the profiles that size them (every number the profiles change: data sizes, steps, minutes,
evaluation sizes, sampling; the wall-clock budget) are in `pipeline.py`, the evaluations in
`evaluation/stage_evaluation.py`; the ablation (`evaluation/ablation.py`) runs the same pieces.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unicode_mllm.data.shapes import ShapesConfig
from unicode_mllm.data.shapes_dataset import analyser_accuracy
from unicode_mllm.errors import UserError
from unicode_mllm.pipeline import (
    DataSizes,
    DemoProfile,
    TimeBudget,
    get_profile,
    load_stage_configs,
    train_stage0,
    train_stage1,
    train_stage2,
    write_demo_data,
)
from unicode_mllm.report import Section, write_report
from unicode_mllm.runtime.run_lock import RunLock

log = logging.getLogger(__name__)


# ============================================================================================ the demo


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def run_demo(
    out_dir: str | Path, quick: bool = False, profile_name: str | None = None, profile: DemoProfile | None = None
) -> dict[str, Any]:
    """Run every stage into `out_dir`; returns the metrics also written to report/metrics.json.

    profile: a caller's own profile (the GPU kit's `small`), reported as `profile_name`; None runs
    `pipeline.PROFILES[profile_name]` (default full, or quick).
    Holds the run lock on `out_dir` throughout (a second demo into it is refused: it would rewrite the data
    under the first one's stages), and each stage holds its own on its run folder."""
    with RunLock(out_dir):
        return _run_demo(Path(out_dir), quick, profile_name, profile)


def _run_demo(out_dir: Path, quick: bool, profile_name: str | None, profile: DemoProfile | None) -> dict[str, Any]:
    if profile is None:
        name = profile_name or ("quick" if quick else "full")
        profile = get_profile(name)
    else:
        name = profile_name or "custom"
    budget = TimeBudget(profile.total_minutes)
    lm_cfg, tokenizer_cfg, mllm_cfg = load_stage_configs(profile)
    if profile.total_minutes is not None and mllm_cfg.train.max_minutes is None:
        raise UserError(f"demo profile {name!r} has a total budget, so its mllm_overrides must set train.max_minutes")
    run = _DemoRun(out_dir, budget, {"profile": name, "stages": {}, "eval": {}})
    metrics = run.metrics
    device = "cuda" if torch.cuda.is_available() else "cpu"

    data_dir = _data(run, profile.data, tokenizer_cfg.model.image_size)
    lm_dir = _stage0(run, lm_cfg)
    # Each guarded stage's cap leaves the minutes of what follows it (stage 2, the evaluation) in the budget.
    reserve = mllm_cfg.train.max_minutes or 0.0
    tok_dir = _stage1(run, tokenizer_cfg, lm_dir, data_dir, reserve + profile.eval_reserve_minutes)
    mllm_dir = _stage2(run, mllm_cfg, (lm_dir, tok_dir, data_dir), profile.eval_reserve_minutes)
    t3 = time.perf_counter()
    _evaluation(run, profile, (tok_dir, mllm_dir, data_dir), device)
    metrics["eval"]["seconds"] = round(time.perf_counter() - t3, 1)

    metrics["seconds"] = round(time.perf_counter() - budget.started, 1)
    metrics["budget_minutes"] = profile.total_minutes
    metrics["device"] = device
    page = write_report(out_dir / "report", "unicode-mllm demo", run.sections, metrics)
    log.info("report: %s", page)
    return metrics


# ============================================================================================ the steps


@dataclass
class _DemoRun:
    """A demo run as its steps see it: where it writes, its time budget, and what each step adds to the report
    (numbers to `metrics`, written to report/metrics.json; its `sections`, in order)."""

    out_dir: Path
    budget: TimeBudget
    metrics: dict[str, Any]
    sections: list[Section] = field(default_factory=list)


def _data(run: _DemoRun, sizes: DataSizes, image_size: int) -> Path:
    """The shapes data at the tokenizer's size and the analyser check (at 64 px) that scores text-to-image; returns
    the data folder."""
    data_dir = run.out_dir / "data" / f"shapes{image_size}"
    result = write_demo_data(sizes, image_size, data_dir)
    shapes_cfg = ShapesConfig(image_size=image_size)
    run.metrics["stages"]["data"] = {split: s.num_samples for split, s in result.summaries.items()}
    run.sections.append(
        Section(
            "Shapes data",
            f"{result.summary()} at {image_size} px; held-out colour+shape pairs: "
            f"{', '.join(shapes_cfg.held_out_pairs)}.",
            images=[(result.grid_path, "training samples with their captions")],
        )
    )
    rows = analyser_accuracy(sizes.analyser_count, 64, seed=shapes_cfg.seed + 1)
    run.metrics["stages"]["analyser"] = {r.condition: r.accuracy for r in rows}
    run.sections.append(
        Section(
            "Analyser check (64 px; it scores text-to-image output)",
            "Exact-scene recovery on freshly rendered validation images.",
            table=[["condition", "images", "exact", "accuracy"]]
            + [[r.condition, r.count, r.exact, f"{100 * r.accuracy:.2f}%"] for r in rows],
        )
    )
    return data_dir


def _stage0(run: _DemoRun, lm_cfg: Any) -> Path:
    """Stage 0 into OUT/lm; returns the LM's folder."""
    lm_run = run.out_dir / "lm"
    lm_dir, lm_metrics = train_stage0(lm_cfg, lm_run)
    run.metrics["stages"]["lm"] = lm_metrics
    run.sections.append(
        Section(
            "Stage 0: the tiny language model",
            f"Held-out loss {lm_metrics['val_loss'] or float('nan'):.3f} nats/token; word embeddings cluster by "
            f"group (mean cosine within groups {lm_metrics['within_group_cosine']:.2f}, across "
            f"{lm_metrics['across_group_cosine']:.2f}; nearest neighbour in the same group "
            f"{100 * lm_metrics['nearest_neighbour_in_group']:.0f}%).",
            images=[(p, "stage-0 loss") for p in [lm_run / "loss_curve.png"] if p.is_file()],
        )
    )
    return lm_dir


def _stage1(run: _DemoRun, tokenizer_cfg: Any, lm_dir: Path, data_dir: Path, reserve_minutes: float) -> Path:
    """Stage 1 into OUT/tokenizer, capped so that `reserve_minutes` of the budget remain; returns the tokenizer's
    folder."""
    t1 = time.perf_counter()
    tok_run = run.out_dir / "tokenizer"
    tok_minutes = run.budget.stage_minutes(tokenizer_cfg.train.max_minutes, reserve_minutes)
    tok = train_stage1(tokenizer_cfg, lm_dir, data_dir, tok_run, tok_minutes)
    run.metrics["stages"]["tokenizer"] = {"seconds": round(time.perf_counter() - t1, 1), "max_minutes": tok_minutes}
    run.metrics["stages"]["tokenizer"].update(tok.metrics)
    grids = sorted((tok_run / "samples").glob("recon-*.png"))
    text = (
        f"{tok.steps} steps; held-out PSNR {tok.metrics.get('psnr_heldout', float('nan')):.2f} dB, "
        f"validation PSNR {tok.metrics.get('psnr_val', float('nan')):.2f} dB; codebook distance to the LLM "
        f"embeddings ||C - C_L||/||C_L|| = {tok.metrics.get('rel_distance')}; unique codes per depth in the "
        f"last window {tok.metrics.get('usage')}."
    )
    images = [(tok_run / "curves.png", "stage-1 curves")] if (tok_run / "curves.png").is_file() else []
    if grids:
        images.append((grids[-1], "top: validation images, bottom: reconstructions"))
    run.sections.append(Section("Stage 1: the visual tokenizer", text, images=images))
    return tok.final_dir


def _stage2(run: _DemoRun, mllm_cfg: Any, inputs: tuple[Path, Path, Path], reserve_minutes: float) -> Path:
    """Stage 2 into OUT/mllm from inputs (the LM, the tokenizer and the data folder), capped so that
    `reserve_minutes` of the budget remain; returns the MLLM's folder."""
    t2 = time.perf_counter()
    mllm_run = run.out_dir / "mllm"
    mllm_minutes = run.budget.stage_minutes(mllm_cfg.train.max_minutes, reserve_minutes)
    mllm = train_stage2(mllm_cfg, *inputs, mllm_run, mllm_minutes)
    run.metrics["stages"]["mllm"] = {"seconds": round(time.perf_counter() - t2, 1), "max_minutes": mllm_minutes}
    run.metrics["stages"]["mllm"].update(mllm.metrics)
    forced = ", ".join(
        f"{split} {_pct(mllm.metrics.get(f'{split}/vqa_exact'))}"
        for split in mllm_cfg.eval.splits
        if f"{split}/vqa_exact" in mllm.metrics
    )
    run.sections.append(
        Section(
            "Stage 2: the MLLM",
            f"{mllm.steps} of {mllm_cfg.train.steps} steps in {run.metrics['stages']['mllm']['seconds']:.0f} s "
            f"(cap {mllm_minutes:.1f} min); task mixture {mllm_cfg.data.tasks.as_dict()}; teacher-forced VQA exact "
            f"match during training: {forced or 'n/a'}; data: {mllm.metrics.get('data')}.",
            images=[(p, "stage-2 curves") for p in [mllm_run / "curves.png"] if p.is_file()],
        )
    )
    return mllm.final_dir


def _evaluation(run: _DemoRun, profile: DemoProfile, trained: tuple[Path, Path, Path], device: str) -> None:
    """Into OUT/eval: reconstruction by the tokenizer, then held-out VQA and text-to-image by the MLLM. trained:
    the tokenizer's folder, the MLLM's and the data folder."""
    from unicode_mllm.evaluation.stage_evaluation import evaluate_mllm, evaluate_visual_tokenizer  # heavy: here

    tok_dir, mllm_dir, data_dir = trained
    eval_dir = run.out_dir / "eval"
    tok_eval = evaluate_visual_tokenizer(tok_dir, data_dir, profile.evaluation, eval_dir, device)
    run.metrics["eval"]["tokenizer"] = tok_eval.scores
    run.sections.append(_reconstruction_section(tok_eval))
    mllm_eval = evaluate_mllm(mllm_dir, data_dir, profile.evaluation, profile.sampling, eval_dir, device)
    run.metrics["eval"].update(mllm_eval.metrics())
    run.sections.append(_vqa_section(mllm_eval, profile))
    run.sections.append(_t2i_section(mllm_eval, profile))


def _reconstruction_section(tok_eval: Any) -> Section:
    table: list[list[Any]] = [["image set", "images", "PSNR (dB)", "SSIM", "LPIPS", "scene kept (analyser)"]]
    for set_name, s in tok_eval.scores.items():
        if s["available"]:
            lp = f"{s['lpips']:.4f}" if s["lpips"] is not None else "not measured (no VGG16 trunk cached)"
            kept = s.get("scene_fidelity")
            scene = f"{kept['overall']:.1%} (shape {kept['shape']:.1%})" if kept else "n/a"
            table.append([set_name, s["num_images"], f"{s['psnr']:.2f}", f"{s['ssim']:.4f}", lp, scene])
        else:
            table.append([set_name, 0, "n/a", "n/a", s["reason"], "n/a"])
    return Section(
        "Evaluation: reconstruction",
        "The stage-1 tokenizer on validation images (seen colour+shape pairs), held-out pairs and real "
        "photos resized to its input size (out of domain). Each pair: original | reconstruction. 'Scene "
        "kept': the shapes analyser reads each reconstruction back; the share of images whose every object "
        "keeps its shape, colour and position (the ceiling of the text-to-image score).",
        table=table,
        images=[(path, f"{set_name}: original | reconstruction") for set_name, path in tok_eval.grids.items()],
    )


def _vqa_section(mllm_eval: Any, profile: DemoProfile) -> Section:
    vqa = mllm_eval.vqa
    return Section(
        "Evaluation: held-out VQA",
        f"Exact match {_pct(vqa.accuracy)} over {vqa.num_questions} questions about images that contain "
        f"held-out colour+shape pairs (greedy decoding with generation.answer, at most "
        f"{profile.evaluation.vqa_per_image} questions per image); {vqa.skips.summary()}.",
        table=[["question kind", "questions", "correct", "exact match"]]
        + [[k, v["total"], v["correct"], _pct(v["accuracy"])] for k, v in vqa.per_kind().items()],
        images=[(mllm_eval.vqa_gallery, "held-out images with the question, the predicted and the true answer")],
    )


def _t2i_section(mllm_eval: Any, profile: DemoProfile) -> Section:
    t2i = mllm_eval.t2i
    columns = ("overall", "shape", "colour", "position", "size", "count", "exact")
    table = [["prompts", "n", *columns]]
    for group in [*t2i.groups, None]:
        g = t2i.group_summary(group)
        table.append([group or "all", g["num_prompts"], *[_pct(g[c]) for c in columns]])
    s = profile.sampling
    return Section(
        "Evaluation: text-to-image",
        f"Drawing instructions of seen and held-out colour+shape pairs, one image each (temperature "
        f"{s.temperature}, top-k {s.top_k}, top-p {s.top_p}, CFG scale {s.cfg_scale}, seed {s.seed}), read back "
        "by the shapes analyser: 'overall' = every object right in shape, colour and position, and the count.",
        table=table,
        images=[(mllm_eval.t2i_grid, "generated images with their instruction ([group] ok/wrong)")],
    )


__all__ = ["get_profile", "run_demo"]
