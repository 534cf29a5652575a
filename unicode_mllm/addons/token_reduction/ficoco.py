"""FiCoCo (Filter-Correlate-Compress): discard redundant tokens, then fold them into correlated kept ones.

Method (FiCoCo, arXiv 2411.17686): token reduction as three stages.
- Filter: a per-token score decides the r tokens to discard.
- Correlate: every discarded token i gets target tokens among the *kept* ones, the top-k of a softmax
  over its affinities, with weights renormalised over those k.
- Compress: each target absorbs its share: x_j <- (s_j x_j + sum_i w_ij s_i x_i) / (s_j + sum_i w_ij s_i),
  s_j <- s_j + sum_i w_ij s_i (s = how many original tokens a slot stands for). This conserves
  sum_j s_j x_j, so no token's content is lost, only averaged into its neighbours.

FiCoCo-V (vision stage, `ficoco_vision_reduce`). The reference scores tokens inside CLIP with pre-softmax
ViT attention logits and the CLS row; UniCode reads code embeddings with no ViT, so the stage runs once on
the (h*w, c) embeddings with cosine similarity standing in for the logits: redundancy_j = mean over k != j
of cos(x_j, x_k) (the reference's `mean_k A[j, k]` term); the r most redundant are discarded (there is no
CLS-importance term and no protected CLS); affinities are cos / temperature.

FiCoCo-L (in the LM, `FiCoCoLPruner`), on the pruning layer's head-averaged attention *probabilities* A,
V = image tokens, T = text queries (see `pruner.py`):
- filter: score_j = lambda * sum_{k in V, k != j} A[j, k] - (1 - lambda) * mean_{t in T} A[t, j], the r
  largest go (attending mostly to other image tokens = redundant; attended by text = needed);
- correlate: affinity_ij = alpha * (A[i, j] + A[j, i]) + (1 - alpha) * sum_t A[t, i] A[t, j] (direct
  attention in whichever direction the causal mask allows, plus co-attention from the same text tokens);
  weights are proportional to the affinity (softmax of its log) over the top-k kept image tokens;
- compress: as above, on the layer's output hidden states.

After kawhiiiileo/FiCoCo@8995e93 (`FiCoCo_V.py`: `Filter`, `Correlate`, `Compress`; `FiCoCo_L.py`), re-implemented
from reading. Quirks not copied: module-level state (`dst_score_global`, `SQA`) surviving between calls;
batch size 1 (`Con_scores[0, ...]` picks k from sample 0 for all); 576 / 144 tokens and a visual span
starting at 0 hard-coded (`v2llm`); raw logits of *future* (causally masked) text keys used as
"text-to-image" attention; targets that may themselves be discarded (their mass is then lost); compress
without size division in the LM stage; the 2x2 window-minimum amplification of FiCoCo-V's score (its
direction differs between paper and code, and it needs the CLS score). Here: no globals, any batch, an
explicit image mask, probabilities, targets only among kept tokens, size-weighted merges.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unicode_mllm.addons.token_reduction.config import FiCoCoLLMConfig, FiCoCoVisionConfig
from unicode_mllm.addons.token_reduction.image_tokens import (
    VISION_REDUCERS,
    ReducedImageTokens,
    check_grid,
    pack_merged,
)
from unicode_mllm.addons.token_reduction.pruner import LLM_PRUNERS, PruneDecision, PruneInputs, SectionPruner


def select_top(score: Tensor, eligible: Tensor, counts: Tensor) -> Tensor:
    """(b, N) scores -> (b, N) bool marking each row's `counts[b]` highest eligible entries.

    Ties go to the earlier column (stable sort), so the choice never depends on the batch.
    """
    score = score.float().masked_fill(~eligible, float("-inf"))
    order = score.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return eligible & (rank < counts[:, None])


def ficoco_correlate(
    affinity: Tensor, discard: Tensor, target_ok: Tensor, num_targets: int | None, target_quantile: float
) -> tuple[Tensor, Tensor]:
    """Targets and weights for every discarded token: (b, N, N) affinities -> (b, N, k) index, (b, N, k) weights.

    affinity[b, i, j]: how much discarded i belongs with j (softmax logits); discard, target_ok: (b, N) bool.
    k = num_targets, or per row b the reference's quantile rule (see `FiCoCoVisionConfig`), capped by the
    number of allowed targets. Rows that are not discarded, and ranks past a row's own k, get weight 0;
    every discarded row's weights sum to 1. Raises ValueError when a row discards but has no target.
    """
    b, n, _ = affinity.shape
    allowed = target_ok[:, None, :].expand(b, n, n)  # (b, N, N): columns that may receive
    num_allowed = target_ok.sum(dim=-1)  # (b,)
    if bool(((discard.sum(dim=-1) > 0) & (num_allowed == 0)).any()):
        raise ValueError("a row discards tokens but keeps none to merge them into")
    logits = affinity.float().masked_fill(~allowed, float("-inf"))
    if num_targets is not None:
        k_row = torch.full((b,), num_targets, device=affinity.device)
    else:
        # Reference rule: k = max over discarded rows of #allowed entries above the row's quantile, >= 1.
        quantile = torch.nanquantile(affinity.float().masked_fill(~allowed, float("nan")), target_quantile, dim=-1)
        above = ((affinity.float() > quantile[..., None]) & allowed).sum(dim=-1)  # (b, N)
        k_row = above.masked_fill(~discard, 0).amax(dim=-1).clamp(min=1)
    k_row = k_row.minimum(num_allowed).clamp(min=1)  # (b,)
    k = int(k_row.max())
    probs = logits.softmax(dim=-1).nan_to_num(0.0)  # (b, N, N); rows with no allowed column -> 0
    top_w, top_idx = probs.topk(k, dim=-1)  # (b, N, k)
    ranks = torch.arange(k, device=affinity.device)
    top_w = top_w * (ranks[None, None, :] < k_row[:, None, None]) * discard[..., None]
    top_w = top_w / top_w.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return top_idx, top_w


def ficoco_compress(
    x: Tensor, sizes: Tensor, discard: Tensor, targets: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor]:
    """Size-weighted merge of the discarded tokens into their targets: (b, N, c), (b, N) -> same shapes.

    targets, weights: (b, N, k) from `ficoco_correlate`. Conserves sum_j sizes_j * x_j over the kept tokens
    plus what was discarded (fp32 arithmetic, cast back to x's dtype). Discarded rows keep stale values.
    """
    b, n, c = x.shape
    k = targets.shape[-1]
    share = weights * (sizes * discard)[..., None]  # (b, N, k): mass each discarded token sends
    mass = sizes.float().scatter_add(1, targets.reshape(b, n * k), share.reshape(b, n * k))  # (b, N)
    sent = (share[..., None] * x.float()[:, :, None, :]).reshape(b, n * k, c)
    total = (x.float() * sizes[..., None]).scatter_add(1, targets.reshape(b, n * k, 1).expand(b, n * k, c), sent)
    merged = total / mass.clamp(min=1e-12)[..., None]
    merged = torch.where(discard[..., None], x.float(), merged)
    return merged.to(x.dtype), torch.where(discard, sizes, mass)


@VISION_REDUCERS.register("ficoco_v")
def ficoco_vision_reduce(
    image_embeds: Tensor, grid_hw: tuple[int, int], config: FiCoCoVisionConfig, sizes: Tensor | None = None
) -> ReducedImageTokens:
    """FiCoCo-V on code embeddings: (n, h*w, c) -> `ReducedImageTokens` with h*w - num_drop tokens each.

    At least one token per image is kept. sizes: (n, h*w) tokens each input already stands for (ones).
    `assignment` sends a discarded token to its largest-weight target. Raises ValueError for a bad shape.
    """
    h, w = check_grid(image_embeds, grid_hw)
    n, s, _ = image_embeds.shape
    device = image_embeds.device
    x = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    cos = x @ x.transpose(1, 2)  # (n, s, s)
    eye = torch.eye(s, dtype=torch.bool, device=device)
    redundancy = cos.masked_fill(eye, 0.0).sum(dim=-1) / max(s - 1, 1)  # (n, s)
    r = min(config.num_drop, s - 1)
    discard = select_top(redundancy, torch.ones_like(eye[0]).expand(n, s), torch.full((n,), r, device=device))
    keep = ~discard
    affinity = (cos / config.temperature).masked_fill(eye, float("-inf"))
    targets, weights = ficoco_correlate(affinity, discard, keep, config.num_targets, config.target_quantile)
    size = torch.ones(n, s, device=device) if sizes is None else sizes.float()
    merged, new_sizes = ficoco_compress(image_embeds, size, discard, targets, weights)

    main_target = targets.gather(2, weights.argmax(dim=-1, keepdim=True))[..., 0]  # (n, s)
    home = torch.where(discard, main_target, torch.arange(s, device=device).expand(n, s))
    return pack_merged(merged, keep, new_sizes, home, (h, w))


def ficoco_llm_scores(attn: Tensor, is_image: Tensor, is_text_query: Tensor, filter_weight: float) -> Tensor:
    """FiCoCo-L filter score (b, L): lambda * attention to other image tokens - (1 - lambda) * mean text attention."""
    a = attn.float()
    eye = torch.eye(a.shape[-1], dtype=torch.bool, device=a.device)
    to_image = (a.masked_fill(eye, 0.0) * is_image[:, None, :]).sum(dim=-1)  # (b, L): sum_{k in V, k != j} A[j, k]
    num_text = is_text_query.sum(dim=-1, keepdim=True).clamp(min=1)  # (b, 1)
    from_text = (a * is_text_query[:, :, None]).sum(dim=1) / num_text  # (b, L): mean_t A[t, j]
    return filter_weight * to_image - (1.0 - filter_weight) * from_text


def ficoco_llm_affinity(attn: Tensor, is_text_query: Tensor, direct_weight: float) -> Tensor:
    """(b, L, L) affinity: alpha * (A + A^T) + (1 - alpha) * sum_t A[t, i] A[t, j]."""
    a = attn.float()
    from_text = a * is_text_query[:, :, None]  # (b, Lq, Lk), text query rows only
    via_text = from_text.transpose(1, 2) @ from_text  # (b, L, L)
    return direct_weight * (a + a.transpose(1, 2)) + (1.0 - direct_weight) * via_text


@LLM_PRUNERS.register("ficoco_l")
class FiCoCoLPruner(SectionPruner):
    """`LLMTokenPruner` for FiCoCo-L: `config.num_drop` image tokens per row and layer, merged into kept ones."""

    config: FiCoCoLLMConfig

    def select(self, inputs: PruneInputs) -> PruneDecision:
        cfg = self.config
        image = inputs.is_image & inputs.valid
        num_image = image.sum(dim=-1)  # (b,)
        drop_count = (num_image - 1).clamp(min=0).clamp(max=cfg.num_drop)  # at least one image token survives
        score = ficoco_llm_scores(inputs.attn, image, inputs.is_text_query, cfg.filter_weight)
        discard = select_top(score, image, drop_count)
        if not bool(discard.any()):
            return PruneDecision(keep=inputs.valid, hidden=inputs.hidden, sizes=inputs.sizes)
        affinity = ficoco_llm_affinity(inputs.attn, inputs.is_text_query, cfg.direct_weight)
        eye = torch.eye(affinity.shape[-1], dtype=torch.bool, device=affinity.device)
        log_affinity = affinity.clamp(min=1e-30).log().masked_fill(eye, float("-inf"))  # softmax = normalised
        targets, weights = ficoco_correlate(
            log_affinity, discard, image & ~discard, cfg.num_targets, cfg.target_quantile
        )
        hidden, sizes = ficoco_compress(inputs.hidden, inputs.sizes, discard, targets, weights)
        return PruneDecision(keep=inputs.valid & ~discard, hidden=hidden, sizes=sizes)
