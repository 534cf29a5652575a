"""The pipeline's stages as functions, and the profiles that size them: what the demo (`demo.py`) and the
ablation (`evaluation/ablation.py`) both run.

Each stage runs from the repository's YAML presets (`configs/`) with a profile's overrides: the shapes data
(`write_demo_data`), stage 0 (`train_stage0`: the tiny text tokenizer + LLaMA), stage 1 (`train_stage1`: the
visual tokenizer whose codebook is that LLaMA's embedding table) and stage 2 (`train_stage2`). Every number the
profiles change (data sizes, steps, minutes, evaluation sizes, sampling) is set in the PROFILES section below. A
profile with `total_minutes` is a wall-clock budget: stages 1 and 2 get `train.max_minutes` lowered so that the
minutes reserved for what follows them remain (`TimeBudget`). The evaluations of a finished stage are in
`evaluation/stage_evaluation.py`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unicode_mllm.config import load_config
from unicode_mllm.data.shapes import ShapesConfig
from unicode_mllm.data.shapes_dataset import ShapesDatasetResult, write_shapes_dataset
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.checkpoint import CheckpointManager

if TYPE_CHECKING:  # the stages are imported where they run, so that importing this module stays light
    from unicode_mllm.stages.lm import LMTrainConfig
    from unicode_mllm.stages.mllm import MLLMTrainConfig, MLLMTrainResult
    from unicode_mllm.stages.tokenizer.config import TokenizerTrainConfig
    from unicode_mllm.stages.tokenizer.trainer import TokenizerTrainResult

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
    from unicode_mllm.stages.lm import LMTrainConfig
    from unicode_mllm.stages.mllm import MLLMTrainConfig
    from unicode_mllm.stages.tokenizer.config import TokenizerTrainConfig

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
    from unicode_mllm.stages.lm import embedding_structure_report, train_lm

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
    from unicode_mllm.stages.tokenizer.trainer import train_tokenizer

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
    from unicode_mllm.stages.mllm import train_mllm

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
