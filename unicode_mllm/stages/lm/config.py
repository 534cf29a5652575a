"""`LMTrainConfig`: everything stage 0 needs to build the embedded tiny LM from the shapes world's text.

Load it like every other config:

    cfg = load_config(LMTrainConfig, "configs/lm/tiny.yaml", overrides=["train.steps=100"])

Sections: `corpus` (which shapes samples the text comes from), `text_tokenizer` (the byte-level BPE),
`model` (the LLaMA architecture), `optim` (AdamW + warm-up/cosine schedule) and `train` (the loop).
The model's vocabulary size is not configured here: it is the trained text tokenizer's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from unicode_mllm.config import bounded
from unicode_mllm.data.shapes import ShapesConfig
from unicode_mllm.errors import ConfigError
from unicode_mllm.runtime.devices import DeviceChoice
from unicode_mllm.runtime.trackers import TrackerChoice

MixedPrecision = Literal["auto", "no", "bf16", "fp16"]

# 256 byte tokens + the 7 special tokens (see text_tokenizer.SPECIAL_TOKENS) + at least one merge.
MIN_VOCAB_SIZE = 264


def _corpus_shapes() -> ShapesConfig:
    # Text does not depend on the image size; 32 px is the cheapest render (ShapesWorld.sample draws it).
    return ShapesConfig(image_size=32)


@dataclass(frozen=True)
class CorpusConfig:
    """Which samples of the shapes world the LM's text comes from.

    Training text is drawn from the world's `train` split, held-out evaluation text from its `val`
    split (a different RNG stream). Neither contains a held-out colour+shape pair, so the LM never
    reads the pairs kept back for the compositional test.
    """

    train_samples: int = bounded(2000, min=1, help="shapes samples whose text is the training corpus")
    val_samples: int = bounded(200, min=1, help="shapes samples whose text is the held-out evaluation corpus")
    shapes: ShapesConfig = field(default_factory=_corpus_shapes)  # vocabulary, held-out pairs and world seed
    # Fraction of words in the *training* stream encoded in two pieces cut at a random character (see
    # corpus.encode_corpus). BPE on this closed world's text merges every word into one token, so with 0
    # only ~65 of ~440 vocabulary rows ever get a gradient; 0.05 trains ~210 (the merges and bytes the
    # text reaches). Those rows become visual codes, so they should be trained ones. The price is a
    # higher held-out loss on the canonical encoding (measured in the stage-0 report).
    split_word_rate: float = bounded(0.05, min=0.0, max=1.0)


@dataclass(frozen=True)
class TextTokenizerConfig:
    """The byte-level BPE text tokenizer trained on the corpus."""

    # An upper bound: BPE stops merging when every word of the corpus is one token. The shapes world
    # has about a hundred distinct words, so its corpus saturates near 440 tokens whatever you ask.
    vocab_size: int = bounded(512, min=MIN_VOCAB_SIZE, max=1 << 20)
    min_frequency: int = bounded(2, min=1, help="a pair seen fewer times than this is never merged")


@dataclass(frozen=True)
class LMModelConfig:
    """The LLaMA architecture (`transformers.LlamaConfig`); vocab_size comes from the text tokenizer."""

    hidden_size: int = bounded(128, min=8)
    num_hidden_layers: int = bounded(4, min=1)
    num_attention_heads: int = bounded(4, min=1)
    num_key_value_heads: int | None = bounded(None, min=1)  # None: as many as attention heads (no GQA)
    intermediate_size: int = bounded(384, min=1)
    max_position_embeddings: int = bounded(256, min=2)
    rope_theta: float = bounded(10000.0, min=1.0)
    rms_norm_eps: float = bounded(1e-5, min=0.0)
    initializer_range: float = bounded(0.02, min=0.0)
    # Untied: the input embedding is the visual codebook C_L; tying would make the output head move it too.
    tie_word_embeddings: bool = False

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(
                f"head dim hidden_size/num_attention_heads = {self.hidden_size // self.num_attention_heads} "
                "must be even for rotary position embeddings"
            )
        kv_heads = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv_heads:
            raise ValueError(
                f"num_key_value_heads={kv_heads} must divide num_attention_heads={self.num_attention_heads}"
            )


@dataclass(frozen=True)
class LMOptimConfig:
    """AdamW with linear warm-up then cosine decay to `min_lr_ratio * lr`."""

    lr: float = bounded(3e-3, min=0.0)
    # Applied to rank >= 2 weights (projections, the output head); never to norms or biases, and to
    # the input embedding only when `decay_embeddings` is true (see pretrain.build_optimizer).
    weight_decay: float = bounded(0.1, min=0.0)
    decay_embeddings: bool = False
    betas: tuple[float, float] = bounded((0.9, 0.95), min=0.0, max=0.999999)
    eps: float = bounded(1e-8, min=0.0)
    warmup_steps: int = bounded(100, min=0)
    min_lr_ratio: float = bounded(0.1, min=0.0, max=1.0)
    grad_clip: float | None = bounded(1.0, min=0.0)  # max global grad norm; None: no clipping


@dataclass(frozen=True)
class LMLoopConfig:
    """The training loop: length, batches, device, logging and checkpoints."""

    steps: int = bounded(1500, min=1, help="optimizer steps")
    batch_size: int = bounded(16, min=1, help="packed windows per step on each process")
    seq_len: int = bounded(128, min=2, help="tokens per window (inputs; the window holds one more)")
    seed: int = bounded(0, min=0, help="model init and window order")
    device: DeviceChoice = "auto"
    mixed_precision: MixedPrecision = "auto"  # auto: bf16 on a GPU that supports it, else no
    log_every: int = bounded(25, min=1)
    eval_every: int = bounded(250, min=1, help="held-out loss every N steps (and at the end)")
    eval_batches: int | None = bounded(None, min=1)  # None: the whole held-out corpus
    ckpt_every: int = bounded(500, min=1, help="checkpoint every N steps (and always at the end)")
    keep_last: int = bounded(2, min=1, help="checkpoints kept on disk")
    out_dir: Path = Path("runs/lm/tiny")
    log_with: TrackerChoice = "none"  # experiment tracker: none | tensorboard | wandb | aim (extras of the same name)
    log_dir: str | None = None  # the tracker's folder (None: out_dir/trackers)


@dataclass(frozen=True)
class LMTrainConfig:
    """Stage 0: corpus -> text tokenizer -> LLaMA pre-training -> `save_pretrained` folder."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    text_tokenizer: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    model: LMModelConfig = field(default_factory=LMModelConfig)
    optim: LMOptimConfig = field(default_factory=LMOptimConfig)
    train: LMLoopConfig = field(default_factory=LMLoopConfig)

    def validate(self) -> None:
        if self.train.seq_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}; lower the one or raise the other"
            )
        if self.optim.warmup_steps > self.train.steps:
            raise ConfigError(
                f"optim.warmup_steps={self.optim.warmup_steps} exceeds train.steps={self.train.steps}; "
                "warm-up must end before training does"
            )
