"""MustDrop stage 2 (prefill): dual-attention filtering of image tokens inside the LM.

Method (MustDrop, arXiv 2411.10803, "dual-attention filtering"): at a pruning layer, take the head-averaged
attention probabilities A from the text tokens T (queries) to the image tokens V (keys). For image token j:
s_j = sum_t A[t, j] (global attention), m_j = max_t A[t, j] (individual attention). Token j is dropped iff
s_j < global_threshold * sum_{j' in V} s_j' *and* m_j < individual_threshold: the global test proposes
candidates that the text as a whole ignores, the individual test rescues any that one text token needs.
Dropped tokens leave the sequence from the next layer on; text is never dropped.

After liuting20/MustDrop@909afa5, `llava/model/language_model/modelling_sparse_llama.py`
(`LlamaDynamicvitModel.forward`, `dual_attention_filter`), re-implemented from reading. Quirks not copied:
- `attn[0]`: only batch element 0 is scored, so a batch > 1 prunes every row with row 0's decision; here
  each row is scored on its own attention and keeps its own count (the loop re-pads);
- the visual span is `[pre_prompt_length_list[0], +576)` (one span, CLIP's 576 tokens hard-coded, the first
  sample's prompt length for all); here image tokens are an explicit (b, L) mask, any number of spans;
- text = everything after the image span; here text queries are the real non-image tokens after the row's
  first image token (the same set for one image; padding never votes);
- position ids are cut to 0..L'-1 after pruning (`position_ids.narrow`); here that is the `renumber`
  policy, and the default `keep_original` keeps each survivor's RoPE position (see `prefill.py`);
- the CLS-attention key set is never pruned in the reference; UniCode has no ViT CLS, so no key set.
"""

from __future__ import annotations

from torch import Tensor

from unicode_mllm.addons.token_reduction.config import MustDropFilterConfig
from unicode_mllm.addons.token_reduction.pruner import LLM_PRUNERS, PruneDecision, PruneInputs, SectionPruner


def text_to_image_attention(attn: Tensor, is_text_query: Tensor) -> Tensor:
    """(b, L, L) probabilities + (b, L) text-query mask -> (b, L, L) with non-text query rows zeroed."""
    return attn * is_text_query[:, :, None].to(attn.dtype)


def dual_attention_filter(
    attn: Tensor, is_image: Tensor, is_text_query: Tensor, global_threshold: float, individual_threshold: float
) -> Tensor:
    """(b, L, L) head-averaged probabilities -> (b, L) bool: the image tokens MustDrop drops.

    is_image, is_text_query: (b, L) bool. A row without text queries drops nothing (no evidence).
    """
    from_text = text_to_image_attention(attn.float(), is_text_query)  # (b, Lq, Lk)
    global_attn = from_text.sum(dim=1)  # (b, Lk): s_j
    individual_attn = from_text.amax(dim=1)  # (b, Lk): m_j
    total = (global_attn * is_image).sum(dim=-1, keepdim=True)  # (b, 1)
    return is_image & (global_attn < global_threshold * total) & (individual_attn < individual_threshold)


@LLM_PRUNERS.register("mustdrop")
class MustDropPruner(SectionPruner):
    """`LLMTokenPruner` for MustDrop stage 2 at `config.layers`."""

    config: MustDropFilterConfig

    def select(self, inputs: PruneInputs) -> PruneDecision:
        drop = dual_attention_filter(
            inputs.attn,
            inputs.is_image & inputs.valid,
            inputs.is_text_query,
            self.config.global_threshold,
            self.config.individual_threshold,
        )
        return PruneDecision(keep=inputs.valid & ~drop, hidden=inputs.hidden, sizes=inputs.sizes)
