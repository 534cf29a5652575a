"""The stage-1 run configuration (YAML -> typed dataclasses), e.g. configs/tokenizer/tiny.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tokenizer_training.blend_schedule import BlendConfig, check_mode_schedule
from tokenizer_training.losses import LossConfig
from unicode_mllm.config import bounded
from unicode_mllm.data.image_policy import ImagePolicy
from unicode_mllm.errors import ConfigError
from unicode_mllm.runtime.trackers import TrackerChoice


@dataclass
class ModelConfig:
    image_size: int = bounded(32, min=8, max=1024)
    ch: int = bounded(32, min=1)
    ch_mult: tuple[int, ...] = bounded((1, 2, 2), min=1)
    num_res_blocks: int = bounded(1, min=0)
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = bounded(32, min=1)
    dropout: float = bounded(0.0, min=0.0, max=1.0)
    stacking: Literal["rq", "hq", "vq"] = "rq"
    depth: int = bounded(2, min=1, max=16, help="codes per position for 'rq' ('vq' is 1, 'hq' is 5)")


@dataclass
class CodebookConfig:
    llm: str = ""  # path or hub name of the causal LM whose input embeddings are C_L
    policy: Literal["all", "norm", "limit"] = "all"
    min_norm: float = bounded(1.0, min=0.0)
    max_codes: int | None = bounded(None, min=2)
    mode: Literal["language_driven", "frozen", "dual", "separate"] = "language_driven"
    separate_num_codes: int = bounded(256, min=2, help="separate mode: size of its own codebook")
    decay: float = bounded(0.99, min=0.0, max=1.0, help="EMA decay of the codebook statistics per step")
    commitment_weight: float = bounded(0.25, min=0.0)
    norm_matching: Literal["running_ratio", "moments", "none"] = "running_ratio"
    freeze_stats_when_fixed: bool = False  # ramp tail: also stop updating the norm-matching statistics
    # native: chunked argmin + index_add_ EMA, 4-5x faster per step than the library at 512x64 and 32000x4096
    # (BENCHMARKS.md) with the same codes; "library" (vector-quantize-pytorch's ResidualVQ) stays selectable.
    backend: Literal["library", "native"] = "native"
    # native only: choose codes in the span of C_L's `search_dim` leading principal directions (the full
    # rows are still what is summed and decoded); None searches the full LLM width. See native_quantizer.py.
    search_dim: int | None = bounded(None, min=1)
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
        if self.codebook.search_dim is not None and self.codebook.backend != "native":
            raise ConfigError(
                f"codebook.search_dim={self.codebook.search_dim} needs codebook.backend='native'; "
                "set --set codebook.backend=native or unset search_dim"
            )
        if self.model.stacking == "vq" and self.model.depth != 1:
            raise ConfigError(f"model.stacking='vq' needs model.depth=1 (got {self.model.depth})")
        factor = 2 ** (len(self.model.ch_mult) - 1)
        if self.model.image_size % factor:
            raise ConfigError(
                f"model.image_size {self.model.image_size} must be divisible by 2**(len(model.ch_mult)-1) = {factor}"
            )
        if self.train.mixed_precision == "fp16" and self.train.device == "cpu":
            raise ConfigError("train.mixed_precision='fp16' needs a GPU; use 'no' or 'bf16' on CPU")
