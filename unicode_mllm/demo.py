"""The README's main job: the whole pipeline on the embedded tiny preset, ending in `report/`.

Stages run in order, each from the repository's YAML presets (`configs/`) with the profile's
overrides, and each adds its figures to the report:

1. data: the shapes world as webdataset shards (+ a sample grid) and the analyser check;
2. stage 0: the tiny text tokenizer + LLaMA pre-trained on the shapes text;
3. stage 1: the visual tokenizer whose codebook is that LLaMA's embedding table;
4. stage 2: the LLaMA fine-tuned to read and write images (`configs/mllm/tiny.yaml`);
5. evaluation: reconstruction (PSNR/SSIM on val, heldout and out-of-domain photos), held-out VQA
   with greedy decoding, text-to-image scored by the shapes analyser on seen and held-out pairs.

Every number the profiles change (data sizes, steps, minutes, evaluation sizes, sampling) is set in
the PROFILES section below. A profile with `total_minutes` is a wall-clock budget: stages 1 and 2
get `train.max_minutes` lowered so that the minutes reserved for what follows them remain
(`TimeBudget`). The pieces (`train_stage0`, `train_stage1`, `train_stage2`, `evaluate_*`) are reused
by the ablation (`evaluation/ablation.py`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unicode_mllm.config import load_config
from unicode_mllm.data.shapes import ShapesConfig
from unicode_mllm.data.shapes_dataset import ShapesDatasetResult, analyser_accuracy, write_shapes_dataset
from unicode_mllm.errors import UserError
from unicode_mllm.report import Section, write_report
from unicode_mllm.runtime.checkpoint import CheckpointManager
from unicode_mllm.runtime.run_lock import RunLock

if TYPE_CHECKING:  # the stages are imported where they run, so that importing the demo stays light
    from tokenizer_training.config import TokenizerTrainConfig
    from tokenizer_training.trainer import TokenizerTrainResult
    from unicode_mllm.evaluation import SkipCounts, T2IResult, VQAItem, VQAResult
    from unicode_mllm.lm import LMTrainConfig
    from unicode_mllm.training import MLLMTrainConfig, MLLMTrainResult

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
LM_PRESET = "lm/tiny.yaml"
TOKENIZER_PRESET = "tokenizer/tiny.yaml"
MLLM_PRESET = "mllm/tiny.yaml"
MIN_STAGE_MINUTES = 0.1  # a stage squeezed by the budget still runs (and saves) at least this long


# ============================================================================================ PROFILES
# The one place to set what each profile runs. Stage settings are overrides of the preset YAMLs
# (configs/lm/tiny.yaml, configs/tokenizer/tiny.yaml, configs/mllm/tiny.yaml), in `--set` syntax.


@dataclass(frozen=True)
class DataSizes:
    train: int
    val: int
    heldout: int
    analyser_count: int  # freshly rendered images per condition for the analyser check


@dataclass(frozen=True)
class EvalSizes:
    tokenizer_images: int  # reconstructed images per split (val, heldout)
    photos: tuple[str, ...]  # scikit-image photos reconstructed out of domain (empty: none)
    vqa_questions: int  # held-out questions asked (greedy decoding)
    vqa_per_image: int  # at most this many of one image's questions (spreads them over images)
    t2i_prompts: int  # drawing instructions per group (seen, heldout)
    batch_size: int
    gallery: int  # answered questions and generated images shown in the report
    max_answer_tokens: int = 16


@dataclass(frozen=True)
class Sampling:
    """Text-to-image sampling for the evaluation (greedy decoding draws flat images)."""

    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float | None = None
    cfg_scale: float = 3.0  # classifier-free guidance against the empty prompt (stage 2 drops 10% of prompts)
    seed: int = 0  # batch i of prompts is drawn with seed + i


@dataclass(frozen=True)
class StagePresets:
    """The preset YAMLs (relative to configs/) whose settings a profile's overrides change."""

    lm: str = LM_PRESET
    tokenizer: str = TOKENIZER_PRESET
    mllm: str = MLLM_PRESET


@dataclass(frozen=True)
class DemoProfile:
    data: DataSizes
    lm_overrides: tuple[str, ...]  # stage 0 has no time guard: its steps bound it
    tokenizer_overrides: tuple[str, ...]
    mllm_overrides: tuple[str, ...]
    evaluation: EvalSizes
    sampling: Sampling = field(default_factory=Sampling)
    total_minutes: float | None = None  # wall-clock budget of the whole run (None: the stages' own caps only)
    eval_reserve_minutes: float = 0.0  # kept free after stage 2 for the evaluation and the report
    presets: StagePresets = field(default_factory=StagePresets)  # the tiny presets (the GPU kit's: small)


PROFILES: dict[str, DemoProfile] = {
    # `unicode-mllm demo`: <= 30 minutes on the 2-core CPU (23 min 48 s measured alone, RESULTS.md). Measured
    # standalone with 2 threads: data + analyser ~0.3 min, stage 0 (1,500 steps) ~3.9 min; stage 1 is the preset
    # (hq, 4,000 steps, cosine; 0.13 s/step alone, 9.0 min). Stage 2 gets 10 minutes: 800 steps at ~0.7 s/step
    # with 2 threads (1.1-1.4 s/step with 1 thread beside other runs), so that its cosine schedule ends; the cap
    # stops it earlier if slower. The evaluation takes ~1 min at these sizes.
    "full": DemoProfile(
        data=DataSizes(train=5000, val=200, heldout=200, analyser_count=1000),
        lm_overrides=(),
        tokenizer_overrides=("train.max_minutes=12.5",),  # the preset: hq, 4,000 steps, cosine (0.13 s/step alone)
        mllm_overrides=("train.steps=800", "train.max_minutes=10"),
        evaluation=EvalSizes(
            tokenizer_images=200,
            photos=("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "coins"),
            vqa_questions=600,
            vqa_per_image=3,
            t2i_prompts=100,
            batch_size=32,
            gallery=16,
        ),
        total_minutes=30.0,
        eval_reserve_minutes=3.0,
    ),
    # `unicode-mllm demo --quick`: <= 5 minutes on the 2-core CPU; every stage, few steps (3.7 minutes with
    # 1 thread beside two other runs: stage 2 stopped by its cap at step 69).
    "quick": DemoProfile(
        data=DataSizes(train=500, val=64, heldout=64, analyser_count=100),
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
            "train.max_minutes=1.5",
        ),
        mllm_overrides=(
            "train.steps=150",
            "train.eval_every=75",
            "train.ckpt_every=75",
            "eval.records=20",
            "train.max_minutes=1.5",
        ),
        evaluation=EvalSizes(
            tokenizer_images=64,
            photos=("astronaut", "coffee", "chelsea", "rocket"),
            vqa_questions=150,
            vqa_per_image=3,
            t2i_prompts=16,
            batch_size=32,
            gallery=12,
        ),
        total_minutes=5.0,
        eval_reserve_minutes=0.75,
    ),
    # For the test suite: every stage runs end to end on a handful of samples and steps.
    "smoke": DemoProfile(
        data=DataSizes(train=32, val=16, heldout=16, analyser_count=5),
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
            "train.max_minutes=2",
        ),
        mllm_overrides=(
            "train.steps=2",
            "train.log_every=1",
            "train.eval_every=2",
            "train.ckpt_every=2",
            "data.records_per_batch=2",
            "data.vqa_turns=2",
            "eval.records=4",
            "eval.batch_size=8",
            "train.max_minutes=2",
        ),
        evaluation=EvalSizes(
            tokenizer_images=8,
            photos=("astronaut",),
            vqa_questions=6,
            vqa_per_image=2,
            t2i_prompts=2,
            batch_size=8,
            gallery=4,
            max_answer_tokens=4,
        ),
        total_minutes=10.0,
        eval_reserve_minutes=1.0,
    ),
}


def get_profile(name: str) -> DemoProfile:
    if name not in PROFILES:
        raise UserError(f"demo profile {name!r} is unknown; choose one of {sorted(PROFILES)}")
    return PROFILES[name]


# ============================================================================================ budget


@dataclass
class TimeBudget:
    """The profile's wall-clock budget, from the moment this object is made.

    `stage_minutes` gives the `train.max_minutes` of the next guarded stage: the configured value,
    lowered so that `reserve_minutes` (the stages after it) still fit in `total_minutes`.
    """

    total_minutes: float | None
    started: float = field(default_factory=time.perf_counter)

    def elapsed_minutes(self) -> float:
        return (time.perf_counter() - self.started) / 60.0

    def stage_minutes(self, configured: float | None, reserve_minutes: float) -> float | None:
        if self.total_minutes is None:
            return configured
        left = max(MIN_STAGE_MINUTES, self.total_minutes - self.elapsed_minutes() - reserve_minutes)
        return left if configured is None else min(configured, left)


def _with_max_minutes(cfg: Any, minutes: float | None) -> Any:  # any stage config with train.max_minutes
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_minutes=minutes))


# ============================================================================================ stages


def preset_path(relative: str) -> Path:
    path = CONFIG_ROOT / relative
    if not path.is_file():
        raise UserError(f"preset {path} not found: run the demo from a clone of the repository (pip install -e .)")
    return path


def _latest_checkpoint_exists(run_dir: Path) -> bool:
    # Any checkpoint, even with latest.json lost: the trainers refuse to overwrite one without resume.
    return CheckpointManager(run_dir / "checkpoints").exists()


def load_stage_configs(profile: DemoProfile) -> tuple[LMTrainConfig, TokenizerTrainConfig, MLLMTrainConfig]:
    """The stage-0, stage-1 and stage-2 configs of `profile` (paths between stages not yet filled in).

    Stage 0's `model.max_position_embeddings` is raised to stage 2's `data.max_length` where it is
    smaller: the MLLM reads and writes image spans longer than the text LM's windows, and generation
    refuses prompts past the LM's declared positions.
    """
    from tokenizer_training.config import TokenizerTrainConfig
    from unicode_mllm.lm import LMTrainConfig
    from unicode_mllm.training import MLLMTrainConfig

    presets = profile.presets
    mllm_cfg = load_config(MLLMTrainConfig, preset_path(presets.mllm), profile.mllm_overrides)
    lm_cfg = load_config(LMTrainConfig, preset_path(presets.lm), profile.lm_overrides)
    if lm_cfg.model.max_position_embeddings < mllm_cfg.data.max_length:
        lm_cfg = load_config(
            LMTrainConfig,
            preset_path(presets.lm),
            [*profile.lm_overrides, f"model.max_position_embeddings={mllm_cfg.data.max_length}"],
        )
    tokenizer_cfg = load_config(TokenizerTrainConfig, preset_path(presets.tokenizer), profile.tokenizer_overrides)
    return lm_cfg, tokenizer_cfg, mllm_cfg


def write_demo_data(sizes: DataSizes, image_size: int, out_dir: Path) -> ShapesDatasetResult:
    """Shapes shards at `image_size` px into `out_dir` (replacing earlier ones); returns the write result."""
    counts = {"train": sizes.train, "val": sizes.val, "heldout": sizes.heldout}
    return write_shapes_dataset(ShapesConfig(image_size=image_size), out_dir, counts, overwrite=True)


def train_stage0(lm_cfg: LMTrainConfig, run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Stage 0 into `run_dir` (resumed when it holds checkpoints); returns the model folder and its metrics."""
    from unicode_mllm.lm import embedding_structure_report, train_lm

    started = time.perf_counter()
    lm_dir = train_lm(lm_cfg, out_dir=run_dir, resume=_latest_checkpoint_exists(run_dir))
    lm_metrics = json.loads((run_dir / "metrics.json").read_text())
    structure = embedding_structure_report(lm_dir)
    return lm_dir, {
        "seconds": round(time.perf_counter() - started, 1),
        "val_loss": lm_metrics.get("val_loss"),
        "val_ppl": lm_metrics.get("val_ppl"),
        "within_group_cosine": structure["within_cosine"],
        "across_group_cosine": structure["across_cosine"],
        "nearest_neighbour_in_group": structure["nn_same_group"],
    }


def train_stage1(
    tokenizer_cfg: TokenizerTrainConfig, lm_dir: Path, data_dir: Path, run_dir: Path, max_minutes: float | None
) -> TokenizerTrainResult:
    """Stage 1 on `data_dir` with C_L from `lm_dir` (resumed when possible); returns the trainer's result."""
    from tokenizer_training.trainer import train_tokenizer

    codebook = dataclasses.replace(tokenizer_cfg.codebook, llm=str(lm_dir))
    data = dataclasses.replace(tokenizer_cfg.data, shards=str(data_dir))
    cfg = _with_max_minutes(dataclasses.replace(tokenizer_cfg, codebook=codebook, data=data), max_minutes)
    cfg.validate()
    return train_tokenizer(cfg, out_dir=run_dir, resume=_latest_checkpoint_exists(run_dir))


def train_stage2(
    mllm_cfg: MLLMTrainConfig,
    lm_dir: Path,
    tokenizer_dir: Path,
    data_dir: Path,
    run_dir: Path,
    max_minutes: float | None,
) -> MLLMTrainResult:
    """Stage 2 from `lm_dir` + the frozen tokenizer on `data_dir` (resumed when possible); the trainer's result."""
    from unicode_mllm.training import train_mllm

    model = dataclasses.replace(mllm_cfg.model, lm=str(lm_dir), visual_tokenizer=str(tokenizer_dir))
    data = dataclasses.replace(mllm_cfg.data, shards=str(data_dir))
    cfg = _with_max_minutes(dataclasses.replace(mllm_cfg, model=model, data=data), max_minutes)
    cfg.validate()
    return train_mllm(cfg, out_dir=run_dir, resume=_latest_checkpoint_exists(run_dir))


def check_lm_positions(lm_dir: Path, needed: int) -> None:
    """Raise UserError when the LM at `lm_dir` declares fewer positions than stage 2's sequences need."""
    config = json.loads((Path(lm_dir) / "config.json").read_text())
    positions = config.get("max_position_embeddings")
    if positions is not None and positions < needed:
        raise UserError(
            f"LM {lm_dir} has max_position_embeddings={positions} but stage 2 builds sequences of up to {needed} "
            f"tokens (data.max_length); retrain stage 0 with --set model.max_position_embeddings={needed}"
        )


# ============================================================================================ evaluation


@dataclass
class TokenizerEvaluation:
    """Reconstruction scores per image set (val, heldout, photos) and the grids written."""

    scores: dict[str, dict[str, Any]]  # set -> {num_images, psnr, ssim, lpips, ...} or {available: False, reason}
    grids: dict[str, Path]


def evaluate_visual_tokenizer(
    tokenizer_dir: Path, data_dir: Path, sizes: EvalSizes, out_dir: Path, device: str | torch.device = "cpu"
) -> TokenizerEvaluation:
    """PSNR/SSIM (LPIPS when a VGG16 trunk is cached) on `tokenizer_images` val and heldout images and
    on the photos of `sizes.photos`; photos that cannot be loaded are reported with the reason."""
    from unicode_mllm.evaluation import ImageSet, eval_visual_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    sets: dict[str, Any] = {split: ImageSet.shards(data_dir, split) for split in ("val", "heldout")}
    if sizes.photos:
        sets["photos"] = ImageSet.photos(sizes.photos)
    scores: dict[str, dict[str, Any]] = {}
    grids: dict[str, Path] = {}
    for name, images in sets.items():
        try:
            result = eval_visual_tokenizer(
                tokenizer_dir,
                images,
                lpips_trunk="auto",
                batch_size=sizes.batch_size,
                limit=sizes.tokenizer_images,
                device=device,
                grid_path=out_dir / f"reconstructions-{name}.png",
                grid_count=8,
            )
        except UserError as exn:  # no scikit-image, or none of its photos load here
            if name != "photos":
                raise
            scores[name] = {"available": False, "reason": str(exn)}
            continue
        report = result.to_dict()
        (out_dir / f"tokenizer-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        scores[name] = {
            "available": True,
            "num_images": result.num_images,
            "psnr": result.psnr,
            "ssim": result.ssim,
            "lpips": result.lpips,
            "lpips_note": result.lpips_note,
            "skipped": report["skipped"],
            "usage_per_depth": [u["distinct"] for u in report["usage"]["per_depth"]],
            "scene_fidelity": report["scene_fidelity"],  # None for the photos
        }
        if result.grid_path is not None:
            grids[name] = result.grid_path
    return TokenizerEvaluation(scores, grids)


def spread_vqa_items(data_dir: Path, split: str, limit: int, per_image: int, skips: SkipCounts) -> list[VQAItem]:
    """At most `per_image` questions of each image of the split, up to `limit` in all, in manifest order.

    Image k contributes its questions (k * per_image + i) mod n, i < per_image, so that every question
    kind comes up across images instead of the first images' questions filling the limit.
    """
    from unicode_mllm.evaluation import shapes_vqa_items

    if limit < 1 or per_image < 1:
        raise ValueError(f"limit and per_image must be >= 1 (got {limit}, {per_image})")
    items: list[VQAItem] = []
    stream = shapes_vqa_items(data_dir, split, skips)
    try:
        groups = itertools.groupby(stream, key=lambda item: item.source.rsplit("#", 1)[0])
        for k, (_, group) in enumerate(groups):
            questions = list(group)
            n = len(questions)
            items += [questions[(k * per_image + i) % n] for i in range(min(per_image, n))]
            if len(items) >= limit:
                break
    finally:
        stream.close()  # the shard reader adds its skip counts when it closes
    return items[:limit]


@dataclass
class MLLMEvaluation:
    """Held-out VQA and text-to-image results of one stage-2 model, with the report's figures."""

    vqa: VQAResult
    t2i: T2IResult
    vqa_gallery: Path
    t2i_grid: Path
    decoding: dict[str, Any]
    sampling: dict[str, Any]

    def metrics(self) -> dict[str, Any]:
        t2i = self.t2i.to_dict()
        return {
            "vqa": {
                "split": self.vqa.source.get("split"),
                "accuracy": self.vqa.accuracy,
                "num_questions": self.vqa.num_questions,
                "per_kind": self.vqa.per_kind(),
                "skipped": self.vqa.skips.to_dict(),
                "decoding": self.decoding,
            },
            "t2i": {"groups": t2i["groups"], "all": t2i["all"], "sampling": self.sampling},
        }


def evaluate_mllm(
    model_dir: Path,
    data_dir: Path,
    sizes: EvalSizes,
    sampling: Sampling,
    out_dir: Path,
    device: str | torch.device = "cpu",
) -> MLLMEvaluation:
    """Greedy VQA on held-out questions (`UniCodeMLLM.answer`) and text-to-image on seen and held-out
    instructions (`UniCodeMLLM.generate_images`, scored by the shapes analyser); writes the full JSON
    reports and the two figures into `out_dir`."""
    from unicode_mllm.evaluation import SkipCounts, eval_t2i, eval_vqa, shapes_config_from_manifest, shapes_t2i_prompts
    from unicode_mllm.model import UniCodeMLLM
    from unicode_mllm.viz import caption_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    mllm = UniCodeMLLM.from_pretrained(model_dir).to(device).eval()

    # -- VQA: real greedy decoding, questions spread over the held-out images
    skips = SkipCounts()
    items = spread_vqa_items(data_dir, "heldout", sizes.vqa_questions, sizes.vqa_per_image, skips)
    predictions: list[str] = []

    def answer_fn(images: list, questions: list[str]) -> list[str]:
        answers = mllm.answer(
            images, questions, max_new_tokens=sizes.max_answer_tokens, temperature=0.0, batch_size=sizes.batch_size
        )
        predictions.extend(answers)
        return answers

    source = {"kind": "shapes", "data_dir": str(data_dir), "split": "heldout", "per_image": sizes.vqa_per_image}
    vqa = eval_vqa(answer_fn, items, batch_size=sizes.batch_size, source=source, skips=skips)
    decoding = {"max_new_tokens": sizes.max_answer_tokens, "temperature": 0.0}
    (out_dir / "vqa.json").write_text(json.dumps({**vqa.to_dict(), "decoding": decoding}, indent=2) + "\n")
    image_of = [item.source.rsplit("#", 1)[0] for item in items]
    shown = [i for i in range(len(items)) if i == 0 or image_of[i - 1] != image_of[i]][: sizes.gallery]  # 1 per image
    captions = [
        f"Q: {items[i].question}\npredicted: {predictions[i] or '(empty)'}\ntrue: {items[i].answers[0]}" for i in shown
    ]
    vqa_gallery = out_dir / "vqa-answers.png"
    caption_grid([items[i].image for i in shown], captions, columns=4, cell_size=128, max_caption_lines=8).save(
        vqa_gallery
    )

    # -- text-to-image: seen and held-out instructions interleaved, so the grid shows both
    shapes_cfg = shapes_config_from_manifest(data_dir)
    prompts = shapes_t2i_prompts(shapes_cfg, sizes.t2i_prompts)
    seen = [p for p in prompts if p.group == "seen"]
    heldout = [p for p in prompts if p.group == "heldout"]
    prompts = [p for pair in zip(seen, heldout, strict=True) for p in pair]
    batch_index = itertools.count()

    def generate_fn(batch_prompts: list[str]) -> list:
        return mllm.generate_images(
            batch_prompts,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            cfg_scale=sampling.cfg_scale,
            seed=sampling.seed + next(batch_index),
            batch_size=sizes.batch_size,
        )

    t2i_grid = out_dir / "t2i-generations.png"
    t2i = eval_t2i(
        generate_fn, prompts, cfg=shapes_cfg, batch_size=sizes.batch_size, grid_path=t2i_grid, grid_count=sizes.gallery
    )
    sampling_dict = {**dataclasses.asdict(sampling), "batch_size": sizes.batch_size}
    (out_dir / "t2i.json").write_text(json.dumps({**t2i.to_dict(), "sampling": sampling_dict}, indent=2) + "\n")
    return MLLMEvaluation(vqa, t2i, vqa_gallery, t2i_grid, decoding, sampling_dict)


# ============================================================================================ the demo


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def run_demo(
    out_dir: str | Path, quick: bool = False, profile_name: str | None = None, profile: DemoProfile | None = None
) -> dict[str, Any]:
    """Run every stage into `out_dir`; returns the metrics also written to report/metrics.json.

    profile: a caller's own profile (the GPU kit's `small`), reported as `profile_name`; None runs
    PROFILES[profile_name] (default full, or quick).
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
    metrics: dict[str, Any] = {"profile": name, "stages": {}, "eval": {}}
    sections: list[Section] = []
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # -- data -------------------------------------------------------------------------------------
    image_size = tokenizer_cfg.model.image_size
    data_dir = out_dir / "data" / f"shapes{image_size}"
    result = write_demo_data(profile.data, image_size, data_dir)
    shapes_cfg = ShapesConfig(image_size=image_size)
    metrics["stages"]["data"] = {split: s.num_samples for split, s in result.summaries.items()}
    sections.append(
        Section(
            "Shapes data",
            f"{result.summary()} at {image_size} px; held-out colour+shape pairs: "
            f"{', '.join(shapes_cfg.held_out_pairs)}.",
            images=[(result.grid_path, "training samples with their captions")],
        )
    )
    rows = analyser_accuracy(profile.data.analyser_count, 64, seed=shapes_cfg.seed + 1)
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
    lm_run = out_dir / "lm"
    lm_dir, lm_metrics = train_stage0(lm_cfg, lm_run)
    metrics["stages"]["lm"] = lm_metrics
    sections.append(
        Section(
            "Stage 0: the tiny language model",
            f"Held-out loss {lm_metrics['val_loss'] or float('nan'):.3f} nats/token; word embeddings cluster by "
            f"group (mean cosine within groups {lm_metrics['within_group_cosine']:.2f}, across "
            f"{lm_metrics['across_group_cosine']:.2f}; nearest neighbour in the same group "
            f"{100 * lm_metrics['nearest_neighbour_in_group']:.0f}%).",
            images=[(p, "stage-0 loss") for p in [lm_run / "loss_curve.png"] if p.is_file()],
        )
    )

    # -- stage 1 ----------------------------------------------------------------------------------
    t1 = time.perf_counter()
    tok_run = out_dir / "tokenizer"
    reserve = mllm_cfg.train.max_minutes or 0.0
    tok_minutes = budget.stage_minutes(tokenizer_cfg.train.max_minutes, reserve + profile.eval_reserve_minutes)
    tok = train_stage1(tokenizer_cfg, lm_dir, data_dir, tok_run, tok_minutes)
    metrics["stages"]["tokenizer"] = {"seconds": round(time.perf_counter() - t1, 1), "max_minutes": tok_minutes}
    metrics["stages"]["tokenizer"].update(tok.metrics)
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

    # -- stage 2 ----------------------------------------------------------------------------------
    t2 = time.perf_counter()
    mllm_run = out_dir / "mllm"
    mllm_minutes = budget.stage_minutes(mllm_cfg.train.max_minutes, profile.eval_reserve_minutes)
    mllm = train_stage2(mllm_cfg, lm_dir, tok.final_dir, data_dir, mllm_run, mllm_minutes)
    metrics["stages"]["mllm"] = {"seconds": round(time.perf_counter() - t2, 1), "max_minutes": mllm_minutes}
    metrics["stages"]["mllm"].update(mllm.metrics)
    forced = ", ".join(
        f"{split} {_pct(mllm.metrics.get(f'{split}/vqa_exact'))}"
        for split in mllm_cfg.eval.splits
        if f"{split}/vqa_exact" in mllm.metrics
    )
    sections.append(
        Section(
            "Stage 2: the MLLM",
            f"{mllm.steps} of {mllm_cfg.train.steps} steps in {metrics['stages']['mllm']['seconds']:.0f} s "
            f"(cap {mllm_minutes:.1f} min); task mixture {mllm_cfg.data.tasks.as_dict()}; teacher-forced VQA exact "
            f"match during training: {forced or 'n/a'}; data: {mllm.metrics.get('data')}.",
            images=[(p, "stage-2 curves") for p in [mllm_run / "curves.png"] if p.is_file()],
        )
    )

    # -- evaluation -------------------------------------------------------------------------------
    eval_dir = out_dir / "eval"
    t3 = time.perf_counter()
    tok_eval = evaluate_visual_tokenizer(tok.final_dir, data_dir, profile.evaluation, eval_dir, device)
    metrics["eval"]["tokenizer"] = tok_eval.scores
    table: list[list[Any]] = [["image set", "images", "PSNR (dB)", "SSIM", "LPIPS", "scene kept (analyser)"]]
    for set_name, s in tok_eval.scores.items():
        if s["available"]:
            lp = f"{s['lpips']:.4f}" if s["lpips"] is not None else "not measured (no VGG16 trunk cached)"
            kept = s.get("scene_fidelity")
            scene = f"{kept['overall']:.1%} (shape {kept['shape']:.1%})" if kept else "n/a"
            table.append([set_name, s["num_images"], f"{s['psnr']:.2f}", f"{s['ssim']:.4f}", lp, scene])
        else:
            table.append([set_name, 0, "n/a", "n/a", s["reason"], "n/a"])
    sections.append(
        Section(
            "Evaluation: reconstruction",
            "The stage-1 tokenizer on validation images (seen colour+shape pairs), held-out pairs and real "
            "photos resized to its input size (out of domain). Each pair: original | reconstruction. 'Scene "
            "kept': the shapes analyser reads each reconstruction back; the share of images whose every object "
            "keeps its shape, colour and position (the ceiling of the text-to-image score).",
            table=table,
            images=[(path, f"{set_name}: original | reconstruction") for set_name, path in tok_eval.grids.items()],
        )
    )
    mllm_eval = evaluate_mllm(mllm.final_dir, data_dir, profile.evaluation, profile.sampling, eval_dir, device)
    metrics["eval"].update(mllm_eval.metrics())
    vqa = mllm_eval.vqa
    sections.append(
        Section(
            "Evaluation: held-out VQA",
            f"Exact match {_pct(vqa.accuracy)} over {vqa.num_questions} questions about images that contain "
            f"held-out colour+shape pairs (greedy decoding with UniCodeMLLM.answer, at most "
            f"{profile.evaluation.vqa_per_image} questions per image); {vqa.skips.summary()}.",
            table=[["question kind", "questions", "correct", "exact match"]]
            + [[k, v["total"], v["correct"], _pct(v["accuracy"])] for k, v in vqa.per_kind().items()],
            images=[(mllm_eval.vqa_gallery, "held-out images with the question, the predicted and the true answer")],
        )
    )
    t2i = mllm_eval.t2i
    columns = ("overall", "shape", "colour", "position", "size", "count", "exact")
    table = [["prompts", "n", *columns]]
    for group in [*t2i.groups, None]:
        g = t2i.group_summary(group)
        table.append([group or "all", g["num_prompts"], *[_pct(g[c]) for c in columns]])
    s = profile.sampling
    sections.append(
        Section(
            "Evaluation: text-to-image",
            f"Drawing instructions of seen and held-out colour+shape pairs, one image each (temperature "
            f"{s.temperature}, top-k {s.top_k}, top-p {s.top_p}, CFG scale {s.cfg_scale}, seed {s.seed}), read back "
            "by the shapes analyser: 'overall' = every object right in shape, colour and position, and the count.",
            table=table,
            images=[(mllm_eval.t2i_grid, "generated images with their instruction ([group] ok/wrong)")],
        )
    )
    metrics["eval"]["seconds"] = round(time.perf_counter() - t3, 1)

    metrics["seconds"] = round(time.perf_counter() - budget.started, 1)
    metrics["budget_minutes"] = profile.total_minutes
    metrics["device"] = device
    page = write_report(out_dir / "report", "unicode-mllm demo", sections, metrics)
    log.info("report: %s", page)
    return metrics
