"""The README's main job: the whole pipeline on the embedded tiny preset, ending in `report/`.

Stages run in order, each from the repository's YAML presets (`configs/`) with a few profile
overrides, and each adds its figures to the report:

1. data: the shapes world as webdataset shards (+ a sample grid) and the analyser check;
2. stage 0: the tiny text tokenizer + LLaMA pre-trained on the shapes text;
3. stage 1: the visual tokenizer whose codebook is that LLaMA's embedding table.

Stage 2 (the MLLM) joins the pipeline when it lands.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unicode_mllm.config import load_config
from unicode_mllm.data.shapes import ShapesConfig
from unicode_mllm.data.shapes_dataset import analyser_accuracy, write_shapes_dataset
from unicode_mllm.errors import UserError
from unicode_mllm.report import Section, write_report

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class DemoProfile:
    train: int
    val: int
    heldout: int
    analyser_count: int
    lm_overrides: tuple[str, ...] = ()
    tokenizer_overrides: tuple[str, ...] = field(default_factory=tuple)


PROFILES = {
    "full": DemoProfile(train=5000, val=200, heldout=200, analyser_count=1000),
    "quick": DemoProfile(
        train=500,
        val=64,
        heldout=64,
        analyser_count=100,
        lm_overrides=(
            "train.steps=150",
            "optim.warmup_steps=20",
            "train.eval_every=75",
            "train.ckpt_every=75",
            "corpus.train_samples=300",
            "corpus.val_samples=50",
        ),
        tokenizer_overrides=(
            "train.steps=200",
            "codebook.blend.ramp_steps=150",
            "loss.disc_start=120",
            "train.eval_every=100",
            "train.ckpt_every=100",
            "train.max_minutes=3",
        ),
    ),
    # For the test suite: every stage runs end to end on a handful of samples and steps.
    "smoke": DemoProfile(
        train=32,
        val=16,
        heldout=16,
        analyser_count=5,
        lm_overrides=(
            "train.steps=4",
            "optim.warmup_steps=1",
            "train.eval_every=4",
            "train.ckpt_every=4",
            "train.log_every=2",
            "train.batch_size=4",
            "train.seq_len=32",
            "corpus.train_samples=20",
            "corpus.val_samples=5",
            "model.hidden_size=32",
            "model.intermediate_size=64",
            "model.num_hidden_layers=1",
        ),
        tokenizer_overrides=(
            "train.steps=3",
            "codebook.blend.ramp_steps=2",
            "train.eval_every=3",
            "train.ckpt_every=3",
            "train.log_every=1",
            "train.eval_batches=1",
            "data.batch_size=8",
            "model.z_channels=32",
        ),
    ),
}


def _preset(relative: str) -> Path:
    path = CONFIG_ROOT / relative
    if not path.is_file():
        raise UserError(f"preset {path} not found: run the demo from a clone of the repository (pip install -e .)")
    return path


def run_demo(out_dir: str | Path, quick: bool = False, profile_name: str | None = None) -> dict[str, Any]:
    """Run every implemented stage into `out_dir`; returns the metrics also written to report/metrics.json."""
    from tokenizer_training.config import TokenizerTrainConfig
    from tokenizer_training.trainer import train_tokenizer
    from unicode_mllm.lm import LMTrainConfig, embedding_structure_report, train_lm

    out_dir = Path(out_dir)
    name = profile_name or ("quick" if quick else "full")
    if name not in PROFILES:
        raise UserError(f"demo profile {name!r} is unknown; choose one of {sorted(PROFILES)}")
    profile = PROFILES[name]
    metrics: dict[str, Any] = {"profile": name, "stages": {}}
    sections: list[Section] = []
    started = time.perf_counter()

    # -- data -------------------------------------------------------------------------------------
    tokenizer_cfg = load_config(TokenizerTrainConfig, _preset("tokenizer/tiny.yaml"), profile.tokenizer_overrides)
    image_size = tokenizer_cfg.model.image_size
    data_dir = out_dir / "data" / f"shapes{image_size}"
    shapes_cfg = ShapesConfig(image_size=image_size)
    counts = {"train": profile.train, "val": profile.val, "heldout": profile.heldout}
    result = write_shapes_dataset(shapes_cfg, data_dir, counts, overwrite=True)
    metrics["stages"]["data"] = {split: s.num_samples for split, s in result.summaries.items()}
    sections.append(
        Section(
            "Shapes data",
            f"{result.summary()} at {image_size} px; held-out colour+shape pairs: "
            f"{', '.join(shapes_cfg.held_out_pairs)}.",
            images=[(result.grid_path, "training samples with their captions")],
        )
    )
    rows = analyser_accuracy(profile.analyser_count, 64, seed=shapes_cfg.seed + 1)
    metrics["stages"]["analyser"] = {r.condition: r.accuracy for r in rows}
    sections.append(
        Section(
            "Analyser check (64 px; it scores text-to-image output)",
            "Exact-scene recovery on freshly rendered validation images.",
            table=[["condition", "images", "exact", "accuracy"]]
            + [[r.condition, r.count, r.exact, f"{100 * r.accuracy:.2f}%"] for r in rows],
        )
    )

    # -- stage 0 ----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    lm_cfg = load_config(LMTrainConfig, _preset("lm/tiny.yaml"), profile.lm_overrides)
    lm_run = out_dir / "lm"
    lm_dir = train_lm(lm_cfg, out_dir=lm_run, resume=(lm_run / "checkpoints").is_dir())
    lm_metrics = json.loads((lm_run / "metrics.json").read_text())
    structure = embedding_structure_report(lm_dir)
    metrics["stages"]["lm"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "val_loss": lm_metrics.get("val_loss"),
        "val_ppl": lm_metrics.get("val_ppl"),
        "within_group_cosine": structure["within_cosine"],
        "across_group_cosine": structure["across_cosine"],
        "nearest_neighbour_in_group": structure["nn_same_group"],
    }
    sections.append(
        Section(
            "Stage 0: the tiny language model",
            f"Held-out loss {lm_metrics.get('val_loss', float('nan')):.3f} nats/token; word embeddings cluster by "
            f"group (mean cosine within groups {structure['within_cosine']:.2f}, across "
            f"{structure['across_cosine']:.2f}; nearest neighbour in the same group "
            f"{100 * structure['nn_same_group']:.0f}%).",
            images=[(p, "stage-0 loss") for p in [lm_run / "loss_curve.png"] if p.is_file()],
        )
    )

    # -- stage 1 ----------------------------------------------------------------------------------
    t1 = time.perf_counter()
    tokenizer_cfg = load_config(
        TokenizerTrainConfig,
        _preset("tokenizer/tiny.yaml"),
        [*profile.tokenizer_overrides, f"codebook.llm={lm_dir}", f"data.shards={data_dir}"],
    )
    tok_run = out_dir / "tokenizer"
    tok = train_tokenizer(tokenizer_cfg, out_dir=tok_run, resume=(tok_run / "checkpoints" / "latest.json").is_file())
    metrics["stages"]["tokenizer"] = {"seconds": round(time.perf_counter() - t1, 1), **tok.metrics}
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
    sections.append(Section("Stage 1: the visual tokenizer", text, images=images))

    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    page = write_report(out_dir / "report", "unicode-mllm demo", sections, metrics)
    log.info("report: %s", page)
    return metrics
