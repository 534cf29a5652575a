"""`TokenReductionConfig`: which training-free visual-token reductions run, and with what settings.

One frozen dataclass with a nested frozen section per method, JSON-serialisable both ways
(`to_dict` / `from_dict`, tuples written as lists). `from_dict` goes through the project's config loader
(`unicode_mllm.config.config_from_dict`), so unknown keys, wrong types, `Literal` choices and ranges fail
with one `ConfigError` naming the dotted key. Every field is read by the code that runs the method; the
defaults of an unused section are inert.

Two stages can be switched on independently:

- `vision`: reduces the (h*w, c) image embeddings before they are spliced into the prompt
  (`none`, `mustdrop_merge`, `ficoco_v`);
- `llm`: drops visual tokens inside the LM during prefill (`none`, `mustdrop`, `ficoco_l`, `focus_text`),
  with an explicit `position_policy` and `kv_policy` (see `prefill.py`).

`TokenReductionConfig()` (both `none`) is the switched-off reducer: `enabled` is False and every entry point
returns its input unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from unicode_mllm.config import bounded, config_from_dict

VisionReduction = Literal["none", "mustdrop_merge", "ficoco_v"]
LLMReduction = Literal["none", "mustdrop", "ficoco_l", "focus_text"]
PositionPolicy = Literal["keep_original", "renumber"]
KVPolicy = Literal["layerwise", "final_set"]

VISION_REDUCTIONS: tuple[str, ...] = ("none", "mustdrop_merge", "ficoco_v")
LLM_REDUCTIONS: tuple[str, ...] = ("none", "mustdrop", "ficoco_l", "focus_text")
# Sections of methods that were removed: folders saved before carry their (inert, never enabled) defaults, since
# `to_dict` writes every section; `from_dict` drops them so those folders load as before.
_RETIRED_SECTIONS = ("focus_sampler",)


def _check_num_targets(section: str, num_targets: int | None) -> None:
    if num_targets is not None and num_targets < 1:
        raise ValueError(f"{section}.num_targets must be >= 1 or null, got {num_targets}")


@dataclass(frozen=True)
class MustDropMergeConfig:
    """MustDrop stage 1 (`mustdrop_merge.py`): merge spatially redundant neighbours on the (h, w) grid.

    window: (wh, ww) non-overlapping windows tiling the grid from the top-left; the reference uses 3x3 on
        CLIP's 24x24 grid (64 windows); UniCode's 8x8 grid at 2x2 gives 16 windows. Edge windows of a grid
        that the window does not divide are smaller (never padded with fake tokens).
    threshold: a window whose mean pairwise cosine similarity (self-pairs excluded) is >= threshold is merged
        into one token; the reference value is 0.8. A threshold above 1 merges nothing.
    """

    window: tuple[int, int] = (2, 2)
    threshold: float = 0.8

    def validate(self) -> None:
        if len(self.window) != 2 or min(self.window) < 1:
            raise ValueError(f"mustdrop_merge.window must be two sizes >= 1, got {self.window}")
        if self.window == (1, 1):
            raise ValueError("mustdrop_merge.window (1, 1) holds one token per window and can never merge")


@dataclass(frozen=True)
class FiCoCoVisionConfig:
    """FiCoCo-V on code embeddings (`ficoco.py`): filter, correlate, compress before the splice.

    num_drop: tokens discarded per image (the reference drops r = 42 per ViT layer over 12 layers; here one
        pass on the (h*w) code embeddings). 0 keeps everything.
    temperature: softmax temperature of the cosine similarities that weight the correlate step.
    num_targets: kept tokens each discarded one is merged into; None uses the quantile rule below.
    target_quantile: the reference's rule: k = the largest number, over a sample's discarded tokens, of kept
        tokens whose affinity lies above that token's `target_quantile` quantile (at least 1).
    """

    num_drop: int = bounded(16, min=0)
    temperature: float = bounded(0.1, min=1e-6)
    num_targets: int | None = None
    target_quantile: float = bounded(0.998, min=0.0, max=1.0)

    def validate(self) -> None:
        _check_num_targets("ficoco_v", self.num_targets)


@dataclass(frozen=True)
class MustDropFilterConfig:
    """MustDrop stage 2 (`mustdrop_filter.py`): dual-attention filtering at chosen LM layers.

    layers: LM layer indices whose text->image attention decides the drop; tokens leave from the next layer
        on (the reference: [2, 6, 10, 14] of 32).
    global_threshold: drop an image token only if its summed text attention is < global_threshold * the sum
        over all image tokens of the sample ...
    individual_threshold: ... and its largest attention from any single text token is < this.
        Reference pairs (global, individual): ~192 kept of 576 (0.001, 0.001), ~128 (0.0012, 0.001),
        ~64 (0.011, 0.01). global_threshold 0 keeps every token.
    """

    layers: tuple[int, ...] = (2,)
    global_threshold: float = bounded(0.001, min=0.0)
    individual_threshold: float = bounded(0.001, min=0.0)

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        return self.layers


@dataclass(frozen=True)
class FiCoCoLLMConfig:
    """FiCoCo-L (`ficoco.py`): filter, correlate, compress image tokens inside the LM.

    layers: LM layers after which `num_drop` image tokens per sample are discarded and merged into kept ones
        (the reference: every layer from 5 on, r = 14, for a 32-layer LM; give the range explicitly).
    num_drop: tokens discarded per sample per layer (at least one image token always survives).
    filter_weight: lambda in score = lambda * redundancy - (1 - lambda) * text importance (reference 0.6).
    direct_weight: alpha in affinity = alpha * direct + (1 - alpha) * via-text (reference 0.6).
    num_targets, target_quantile: as in `FiCoCoVisionConfig`.
    """

    layers: tuple[int, ...] = (2,)
    num_drop: int = bounded(14, min=0)
    filter_weight: float = bounded(0.6, min=0.0, max=1.0)
    direct_weight: float = bounded(0.6, min=0.0, max=1.0)
    num_targets: int | None = None
    target_quantile: float = bounded(0.998, min=0.0, max=1.0)

    def validate(self) -> None:
        _check_num_targets("ficoco_l", self.num_targets)

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        return self.layers


@dataclass(frozen=True)
class FocusTextConfig:
    """FocusLLaVA's text-guided sampler, training-free use (`mustdrop_filter.py`, `TopKTextAttentionPruner`).

    layer: the LM layer whose text->image attention ranks the image tokens.
    keep_ratio: fraction of each sample's image tokens that continue (at least one).
    """

    layer: int = bounded(2, min=0)
    keep_ratio: float = bounded(0.5, min=0.0, max=1.0)

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        return (self.layer,)


@dataclass(frozen=True)
class TokenReductionConfig:
    """Inference-time visual-token reduction; the default (`none`, `none`) is switched off.

    vision: reduction of image embeddings before the splice.
    llm: pruning of image tokens inside the LM during prefill.
    position_policy: `keep_original` (survivors keep their RoPE positions; decoding continues from the
        unreduced prompt length) or `renumber` (survivors are renumbered 0..n-1 after each reduction, and a
        decoded token's position at a layer is that layer's cache length, the MustDrop reference rule).
    kv_policy: `layerwise` (each layer caches exactly the tokens it processed) or `final_set` (MustDrop's
        output-aware cache: from the first pruning layer on, layers keep only the tokens that survive all
        reductions).
    """

    vision: VisionReduction = "none"
    llm: LLMReduction = "none"
    position_policy: PositionPolicy = "keep_original"
    kv_policy: KVPolicy = "layerwise"
    mustdrop_merge: MustDropMergeConfig = field(default_factory=MustDropMergeConfig)
    ficoco_v: FiCoCoVisionConfig = field(default_factory=FiCoCoVisionConfig)
    mustdrop: MustDropFilterConfig = field(default_factory=MustDropFilterConfig)
    ficoco_l: FiCoCoLLMConfig = field(default_factory=FiCoCoLLMConfig)
    focus_text: FocusTextConfig = field(default_factory=FocusTextConfig)

    @property
    def enabled(self) -> bool:
        return self.vision != "none" or self.llm != "none"

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        """LM layers after which image tokens leave the sequence (sorted, no repeats); () when `llm` is none."""
        if self.llm == "none":
            return ()
        section: MustDropFilterConfig | FiCoCoLLMConfig | FocusTextConfig = getattr(self, self.llm)
        return tuple(sorted(set(section.pruning_layers)))

    def validate(self, num_layers: int | None = None) -> None:
        """Cross-field checks; with `num_layers` also that every pruning layer exists in the LM."""
        if self.vision not in VISION_REDUCTIONS:
            raise ValueError(f"vision {self.vision!r} is unknown; choose one of {list(VISION_REDUCTIONS)}")
        if self.llm not in LLM_REDUCTIONS:
            raise ValueError(f"llm {self.llm!r} is unknown; choose one of {list(LLM_REDUCTIONS)}")
        for section in (self.mustdrop_merge, self.ficoco_v, self.ficoco_l):
            section.validate()
        if self.llm != "none" and not self.pruning_layers:
            raise ValueError(f"llm={self.llm!r} needs at least one pruning layer")
        if any(layer < 0 for layer in self.pruning_layers):
            raise ValueError(f"pruning layers must be >= 0, got {self.pruning_layers}")
        if num_layers is not None and self.pruning_layers and self.pruning_layers[-1] >= num_layers:
            raise ValueError(
                f"pruning layer {self.pruning_layers[-1]} does not exist: the LM has {num_layers} layers "
                f"(0..{num_layers - 1})"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists) that `from_dict` reads back to an equal config."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "token_reduction") -> TokenReductionConfig:
        """Build and validate; raises ConfigError naming an unknown key, a wrong type or a bad value."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in _RETIRED_SECTIONS}
        return config_from_dict(cls, data, source=source)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
