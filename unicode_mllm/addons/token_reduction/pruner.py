"""The in-LM pruner contract: what the prefill loop (`prefill.py`) asks a pruning method at a pruning layer.

After a pruning layer l has run, the loop hands the pruner that layer's head-averaged attention
probabilities (the same softmax the layer computed, with the same causal + padding mask) and the layer's
output hidden states; the pruner answers which tokens continue into layer l + 1, and may rewrite the
hidden states of those that do (merging methods). Text, padding and generated tokens are never dropped:
the loop checks it. Every tensor is batched (b rows, per-row keep counts may differ: the loop re-pads).

Implementations: `MustDropPruner` (`mustdrop_filter.py`), `FiCoCoLPruner` (`ficoco.py`),
`TopKTextAttentionPruner` (`focus_text.py`), each registered in `LLM_PRUNERS` under its `llm` name (the package
`__init__` imports them all); `build_pruner` builds the one a config names from its section of the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from unicode_mllm.addons.token_reduction.config import (
    FiCoCoLLMConfig,
    FocusTextConfig,
    MustDropFilterConfig,
    TokenReductionConfig,
)
from unicode_mllm.registry import Registry


@dataclass
class PruneInputs:
    """What a pruner sees at one pruning layer (L = the current sequence length, padded).

    attn: (b, L, L) fp32 attention probabilities averaged over heads; row = query, column = key.
    hidden: (b, L, c) the layer's output hidden states.
    is_image: (b, L) bool, image tokens still in the sequence (never padding).
    is_text_query: (b, L) bool, the text tokens whose attention ranks image tokens: real, not image,
        after the row's first image token (earlier tokens cannot attend to the image at all).
    valid: (b, L) bool, real tokens (False on padding).
    sizes: (b, L) fp32, how many original tokens each position stands for (merges grow it).
    layer_idx: the LM layer that produced `attn` and `hidden`.
    """

    attn: Tensor
    hidden: Tensor
    is_image: Tensor
    is_text_query: Tensor
    valid: Tensor
    sizes: Tensor
    layer_idx: int


@dataclass
class PruneDecision:
    """keep: (b, L) bool, tokens that continue; hidden: (b, L, c) (merged where the method merges); sizes: (b, L)."""

    keep: Tensor
    hidden: Tensor
    sizes: Tensor


class LLMTokenPruner(Protocol):
    """A training-free in-LM pruner. `layers`: LM layers after which it runs (sorted)."""

    layers: tuple[int, ...]

    def select(self, inputs: PruneInputs) -> PruneDecision: ...


class SectionPruner:
    """Base of the registered pruners: built from their section of `TokenReductionConfig` (the one named like
    the method), run after that section's pruning layers (sorted, no repeats)."""

    def __init__(self, config: MustDropFilterConfig | FiCoCoLLMConfig | FocusTextConfig):
        self.config = config
        self.layers = tuple(sorted(set(config.pruning_layers)))


LLM_PRUNERS: Registry[type[LLMTokenPruner]] = Registry("llm reduction", size_args=("config",))


def build_pruner(config: TokenReductionConfig) -> LLMTokenPruner | None:
    """The pruner `config.llm` names, built from the config's section of the same name; None when it is `none`."""
    if config.llm == "none":
        return None
    return LLM_PRUNERS.build(config.llm, {}, config=getattr(config, config.llm))
