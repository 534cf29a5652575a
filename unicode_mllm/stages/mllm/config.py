"""`MLLMTrainConfig`: the stage-2 run (decompression pre-training + instruction tuning), from YAML.

    cfg = load_config(MLLMTrainConfig, "configs/mllm/tiny.yaml", overrides=["train.steps=100"])

Sections: `model` (which LM and visual tokenizer, reading mode, template, optional LoRA, the visual-token
compressor of image reads: `model.compressor: {name: pool2x, options: {mode: average}}`), `data` (shards,
where the image token ids come from, the task mixture, sample building), `optim`, `train` (the loop) and
`eval` (the teacher-forced evaluation run during training).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from unicode_mllm.addons.compression import CompressorConfig
from unicode_mllm.config import bounded
from unicode_mllm.data.image_policy import ImagePolicy
from unicode_mllm.errors import ConfigError
from unicode_mllm.runtime.devices import DeviceChoice
from unicode_mllm.runtime.trackers import TrackerChoice


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = bounded(128, min=1)
    alpha: int = bounded(256, min=1)
    dropout: float = bounded(0.05, min=0.0, max=1.0)
    target_modules: str = "all-linear"  # peft's shortcut, or a comma-separated list of module names
    train_embeddings: bool = True  # the embedding table is the codebook the LLM reads: keep it trainable


@dataclass
class CompressorSection:
    """The visual-token compressor between the summed code embeddings and the LM (`unicode_mllm.compression`).

    name: a registered compressor (identity, pool2x, deco_avgpool, ldpv2, internvl_ps, qwen2vl_merger, qformer,
        perceiver); options: its keyword arguments, e.g. {target_grid: [4, 4], mlp_layers: 2} for deco_avgpool.
    Trainable compressors train in stage 2 with the LM; all but identity need `reading: aggregated`.
    """

    name: str = "identity"
    options: dict[str, Any] = field(default_factory=dict)

    def to_compressor_config(self) -> CompressorConfig:
        return CompressorConfig(name=self.name, options=dict(self.options))

    def validate(self) -> None:
        self.to_compressor_config().validate()  # ConfigError naming an unknown compressor or option


@dataclass
class MLLMModelConfig:
    lm: str = ""  # a HF causal LM folder or hub name (stage 0's runs/lm/tiny/model for the tiny preset)
    visual_tokenizer: str = ""  # a saved VisualTokenizer (stage 1's runs/tokenizer/tiny/final)
    reading: Literal["aggregated", "interleaved"] = "aggregated"
    template: str = "plain"  # a registered conversation template (data/conversation.py)
    lora: LoraConfig = field(default_factory=LoraConfig)
    compressor: CompressorSection = field(default_factory=CompressorSection)

    def validate(self) -> None:
        if self.reading != "aggregated" and self.compressor.name != "identity":
            raise ConfigError(
                f"model.compressor.name={self.compressor.name!r} needs model.reading='aggregated' (got "
                f"{self.reading!r}); interleaved reading can only use compressor 'identity'"
            )


@dataclass
class TaskWeights:
    """Expected samples of each task per record: the integer part always, the fraction drawn per record."""

    vqa: float = bounded(1.0, min=0.0, max=16.0)
    caption: float = bounded(0.0, min=0.0, max=16.0)
    text_to_image: float = bounded(0.5, min=0.0, max=16.0)
    decompression: float = bounded(0.25, min=0.0, max=16.0)

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


@dataclass
class DataSource:
    """One shard folder of a stage-2 mixture: records of any kind (shapes, LLaVA, captions, VQAv2, folders).

    weight: the share of micro-batches drawn from this source (relative to the other sources' weights).
    tasks: this source's task weights (None: `data.tasks`); a LLaVA source typically weights vqa and
        decompression, a caption source caption, text_to_image and decompression (data/record_samples.py).
    """

    shards: str = ""
    name: str = ""  # how logs and skip counts call it (default: the folder's name)
    weight: float = bounded(1.0, min=0.0)
    tasks: TaskWeights | None = None
    train_split: str | None = None  # None: data.train_split


@dataclass
class MLLMDataConfig:
    shards: str = ""  # one shard folder (manifest.json, or an img2dataset folder); or use `sources`
    sources: list[DataSource] = field(default_factory=list)  # a weighted mixture of shard folders
    train_split: str = "train"
    token_ids: Literal["auto", "precomputed", "encode"] = "auto"  # auto: the shard's visual_token_ids if present
    tasks: TaskWeights = field(default_factory=TaskWeights)
    loss_weighting: Literal["tokens", "tasks"] = "tokens"  # tasks: each task's token mean, weighted by loss_weights
    loss_weights: TaskWeights = field(default_factory=lambda: TaskWeights(1.0, 1.0, 1.0, 1.0))
    vqa_turns: int = bounded(0, min=0, help="question/answer turns per VQA sample (0: every pair of the record)")
    records_per_batch: int = bounded(8, min=1, help="records read per micro-batch; each gives ~sum(tasks) samples")
    max_length: int = bounded(1024, min=8)
    max_tokens_per_forward: int = bounded(4096, min=8, help="padded tokens per forward pass (bounds memory)")
    # Several samples per row of up to max_length tokens, each with its own positions and causal block
    # (data/packing.py): the tiny preset pads 1.40x its real tokens without, ~1.0x with (BENCHMARKS.md). An LM
    # whose attention cannot keep packed samples apart is found by a check at the first step and falls back to
    # length-sorted chunks (one info line).
    packing: bool = True
    overflow: Literal["skip", "truncate"] = "skip"
    cfg_drop_rate: float = bounded(0.1, min=0.0, max=1.0, help="text-to-image prompts replaced by the empty one")
    num_segments: int | None = bounded(None, min=1, help="decompression turns T (None: one grid row per turn)")
    shuffle_buffer: int = bounded(1000, min=1)
    num_workers: int = bounded(0, min=0)
    max_skip_fraction: float = bounded(0.01, min=0.0, max=1.0)
    image: ImagePolicy = field(default_factory=ImagePolicy)  # how images of any size reach the tokenizer

    def resolved_sources(self) -> list[DataSource]:
        """`sources` with defaults filled in, or the one source `shards` names."""
        listed = self.sources or [DataSource(shards=self.shards)]
        out = []
        for source in listed:
            out.append(
                DataSource(
                    shards=source.shards,
                    name=source.name or Path(source.shards).name or "data",
                    weight=source.weight,
                    tasks=source.tasks or self.tasks,
                    train_split=source.train_split or self.train_split,
                )
            )
        return out

    def validate(self) -> None:
        if self.shards and self.sources:
            raise ConfigError("data.shards and data.sources are both set; list every folder under data.sources")
        for i, source in enumerate(self.sources):
            if not source.shards:
                raise ConfigError(f"data.sources[{i}].shards is empty; give the source's shard folder")
        names = [s.name for s in self.resolved_sources()]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources have repeated names {names}; give each a distinct name")
        if self.sources and sum(s.weight for s in self.sources) <= 0:
            raise ConfigError("data.sources: every weight is 0; give at least one source a positive weight")


@dataclass
class MLLMOptimConfig:
    lr: float = bounded(2e-4, min=0.0)
    weight_decay: float = bounded(0.0, min=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = bounded(0.03, min=0.0, max=1.0)
    min_lr_ratio: float = bounded(0.0, min=0.0, max=1.0)
    grad_clip: float = bounded(1.0, min=0.0, help="max gradient norm; 0 disables clipping")
    grad_accum: int = bounded(1, min=1, help="sample groups (records_per_batch records each) per optimizer step")


@dataclass
class MLLMLoopConfig:
    steps: int = bounded(1000, min=1, help="optimizer steps")
    seed: int = 0
    device: DeviceChoice = "auto"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on capable GPUs, else no
    gradient_checkpointing: bool = False
    out_dir: str = "runs/mllm"
    log_every: int = bounded(10, min=1)
    eval_every: int = bounded(250, min=1)
    ckpt_every: int = bounded(250, min=1)
    keep_checkpoints: int = bounded(2, min=1)
    max_minutes: float | None = bounded(None, min=0.0, help="stop (and save) after this wall time")
    num_threads: int | None = bounded(None, min=1, help="torch intra-op threads (None: torch's default)")
    log_with: TrackerChoice = "none"  # experiment tracker: none | tensorboard | wandb | aim (extras of the same name)
    log_dir: str | None = None  # the tracker's folder (None: out_dir/trackers)


@dataclass
class MLLMEvalConfig:
    """Teacher-forced evaluation during training (greedy exact match without decoding, see eval_set.py)."""

    splits: tuple[str, ...] = ("val", "heldout")
    records: int = bounded(100, min=1, help="records read from each eval split")
    batch_size: int = bounded(32, min=1)


@dataclass
class MLLMTrainConfig:
    model: MLLMModelConfig = field(default_factory=MLLMModelConfig)
    data: MLLMDataConfig = field(default_factory=MLLMDataConfig)
    optim: MLLMOptimConfig = field(default_factory=MLLMOptimConfig)
    train: MLLMLoopConfig = field(default_factory=MLLMLoopConfig)
    eval: MLLMEvalConfig = field(default_factory=MLLMEvalConfig)

    def validate(self) -> None:
        for source in self.data.resolved_sources():
            if source.tasks is not None and sum(source.tasks.as_dict().values()) <= 0:
                where = "data.tasks" if source.tasks is self.data.tasks else f"data.sources ({source.name}).tasks"
                raise ConfigError(f"{where}: every weight is 0; give at least one task a positive weight")
        if self.train.mixed_precision == "fp16" and self.train.device == "cpu":
            raise ConfigError("train.mixed_precision='fp16' needs a GPU; use 'no' or 'bf16' on CPU")
