"""The in-LM pruner contract: what the prefill loop (`prefill.py`) asks a pruning method at a pruning layer.

After a pruning layer l has run, the loop hands the pruner that layer's head-averaged attention
probabilities (the same softmax the layer computed, with the same causal + padding mask) and the layer's
output hidden states; the pruner answers which tokens continue into layer l + 1, and may rewrite the
hidden states of those that do (merging methods). Text, padding and generated tokens are never dropped:
the loop checks it. Every tensor is batched (b rows, per-row keep counts may differ: the loop re-pads).

Implementations: `MustDropPruner` (`mustdrop_filter.py`), `FiCoCoLPruner` (`ficoco.py`),
`TopKTextAttentionPruner` (`focus_text.py`). `build_pruner` maps a config to one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from unicode_mllm.token_reduction.config import TokenReductionConfig


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


def build_pruner(config: TokenReductionConfig) -> LLMTokenPruner | None:
    """The pruner `config.llm` names, or None when it is `none`."""
    from unicode_mllm.token_reduction.ficoco import FiCoCoLPruner
    from unicode_mllm.token_reduction.focus_text import TopKTextAttentionPruner
    from unicode_mllm.token_reduction.mustdrop_filter import MustDropPruner

    builders = {
        "mustdrop": lambda: MustDropPruner(config.mustdrop),
        "ficoco_l": lambda: FiCoCoLPruner(config.ficoco_l),
        "focus_text": lambda: TopKTextAttentionPruner(config.focus_text),
    }
    if config.llm == "none":
        return None
    if config.llm not in builders:
        raise ValueError(f"llm reduction {config.llm!r} is unknown; choose one of {['none', *sorted(builders)]}")
    return builders[config.llm]()
