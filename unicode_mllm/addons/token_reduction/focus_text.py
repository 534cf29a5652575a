"""FocusLLaVA's text-guided sampler as a training-free in-LM pruner: keep the top image tokens by text attention.

Method (FocusLLaVA, arXiv 2411.14228, text-guided sampler): at an intermediate layer, rank the image tokens
by the attention the text pays them and let only the top ones continue. The paper trains the model with
it; here it runs training-free (an ablation of the paper's recipe). No public code exists, so
these choices are ours and documented: the score is s_j = sum over text queries t of the head-averaged
probability A[t, j] (as MustDrop's global term), each row keeps ceil(keep_ratio * its image tokens),
at least one, ties broken towards the earlier token, and the survivors stay in sequence order.
"""

from __future__ import annotations

import torch

from unicode_mllm.addons.token_reduction.config import FocusTextConfig
from unicode_mllm.addons.token_reduction.pruner import LLM_PRUNERS, PruneDecision, PruneInputs, SectionPruner


def top_text_attention(attn: torch.Tensor, is_image: torch.Tensor, is_text_query: torch.Tensor, keep_ratio: float):
    """(b, L, L) probabilities -> (b, L) bool: the ceil(keep_ratio * |V_b|) image tokens with most text attention."""
    score = (attn.float() * is_text_query[:, :, None]).sum(dim=1)  # (b, L)
    num_image = is_image.sum(dim=-1)  # (b,)
    keep_count = torch.ceil(num_image.float() * keep_ratio).long().clamp(min=1).minimum(num_image)  # (b,)
    score = score.masked_fill(~is_image, float("-inf"))
    order = score.argsort(dim=-1, descending=True, stable=True)  # (b, L)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return is_image & (rank < keep_count[:, None])


@LLM_PRUNERS.register("focus_text")
class TopKTextAttentionPruner(SectionPruner):
    """`LLMTokenPruner` for the training-free text-guided sampler at `config.layer`."""

    config: FocusTextConfig

    def select(self, inputs: PruneInputs) -> PruneDecision:
        image = inputs.is_image & inputs.valid
        kept_image = top_text_attention(inputs.attn, image, inputs.is_text_query, self.config.keep_ratio)
        return PruneDecision(keep=inputs.valid & (~image | kept_image), hidden=inputs.hidden, sizes=inputs.sizes)
