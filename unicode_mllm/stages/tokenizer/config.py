"""The stage-1 run configuration (YAML -> typed dataclasses), e.g. configs/tokenizer/tiny.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from unicode_mllm.config import bounded
from unicode_mllm.data.image_policy import ImagePolicy
from unicode_mllm.errors import ConfigError
from unicode_mllm.quantizer_settings import (
    QuantizerBackend,
    QuantizerSettings,
    Stacking,
    check_latent_grid,
    stack_code_depth,
)
from unicode_mllm.runtime.trackers import TrackerChoice
from unicode_mllm.stages.tokenizer.blend_schedule import BlendConfig, check_mode_schedule
from unicode_mllm.stages.tokenizer.losses import LossConfig


@dataclass
class ModelConfig:
    image_size: int = bounded(32, min=8, max=1024)
    ch: int = bounded(32, min=1)
    ch_mult: tuple[int, ...] = bounded((1, 2, 2), min=1)
    num_res_blocks: int = bounded(1, min=0)
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = bounded(32, min=1)
    dropout: float = bounded(0.0, min=0.0, max=1.0)
    stacking: Stacking = "rq"
    depth: int = bounded(2, min=1, max=16, help="codes per position for 'rq' ('vq' is 1, 'hq' is 5)")

    def validate(self) -> None:
        # The checks the saved tokenizer's config runs too (quantizer_settings.py); 'hq' ignores `depth`.
        stack_code_depth(self.stacking, None if self.stacking == "hq" else self.depth, key_prefix="model.")
        check_latent_grid(self.image_size, len(self.ch_mult), self.stacking, key_prefix="model.")


@dataclass(frozen=True)
class CodebookConfig(QuantizerSettings):
    """The YAML section `codebook:`: the quantizer's options (`QuantizerSettings`: mode, decay, commitment_weight,
    norm_matching, backend, search_dim, ...; declared and checked there) plus where C_L comes from and how the
    trainer moves the codebook toward it."""

    key_prefix: ClassVar[str] = "codebook."

    # Stage 1 trains with the faster backend (BENCHMARKS.md); a saved tokenizer without the key is a library one.
    backend: QuantizerBackend = "native"
    llm: str = ""  # path or hub name of the causal LM whose input embeddings are C_L
    policy: Literal["all", "norm", "limit"] = "all"
    min_norm: float = bounded(1.0, min=0.0)
    max_codes: int | None = bounded(None, min=2)
    separate_num_codes: int = bounded(256, min=2, help="separate mode: size of its own codebook")
    freeze_stats_when_fixed: bool = False  # ramp tail: also stop updating the norm-matching statistics
    blend: BlendConfig = field(default_factory=BlendConfig)


@dataclass
class DataConfig:
    shards: str = ""  # folder with manifest.json (unicode-mllm data shapes / from-folder)
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("val", "heldout")
    batch_size: int = bounded(32, min=1)
    num_workers: int = bounded(0, min=0)
    shuffle_buffer: int = bounded(1000, min=1)
    max_skip_fraction: float = bounded(0.01, min=0.0, max=1.0)
    # How images reach model.image_size: auto = exact for shapes (never resampled), centre crop for photos.
    image: ImagePolicy = field(default_factory=ImagePolicy)


@dataclass
class OptimConfig:
    lr: float = bounded(2e-4, min=0.0)
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = bounded(0.0, min=0.0)
    disc_lr: float = bounded(2e-4, min=0.0)
    warmup_steps: int = bounded(0, min=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = bounded(0.1, min=0.0, max=1.0, help="cosine: the lr multiplier reached at the last step")
    grad_clip: float = bounded(1.0, min=0.0, help="max gradient norm; 0 disables clipping")


@dataclass
class TrainConfig:
    steps: int = bounded(1000, min=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    mixed_precision: Literal["no", "auto", "bf16", "fp16"] = "no"  # auto: bf16 on GPUs with native bf16
    out_dir: str = "runs/tokenizer"
    log_every: int = bounded(10, min=1)
    eval_every: int = bounded(250, min=1)
    eval_batches: int = bounded(4, min=1)
    ckpt_every: int = bounded(250, min=1)
    keep_checkpoints: int = bounded(2, min=1)
    usage_window: int = bounded(50, min=1, help="steps over which unique codes per depth are counted")
    max_minutes: float | None = bounded(None, min=0.0, help="stop (and save) after this wall time")
    num_threads: int | None = bounded(None, min=1, help="torch intra-op threads (None: torch's default)")
    log_with: TrackerChoice = "none"  # experiment tracker: none | tensorboard | wandb | aim (extras of the same name)
    log_dir: str | None = None  # the tracker's folder (None: out_dir/trackers)


@dataclass
class TokenizerTrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        check_mode_schedule(self.codebook.mode, self.codebook.blend.schedule)
        if self.codebook.blend.schedule == "ramp" and self.codebook.blend.ramp_steps > self.train.steps:
            raise ConfigError(
                f"codebook.blend.ramp_steps ({self.codebook.blend.ramp_steps}) must be <= train.steps "
                f"({self.train.steps}) so the codebook reaches C_L"
            )
        if self.train.mixed_precision == "fp16" and self.train.device == "cpu":
            raise ConfigError("train.mixed_precision='fp16' needs a GPU; use 'no' or 'bf16' on CPU")
