"""MustDrop stage 1 (vision): merge spatially redundant neighbours on the (h, w) code grid.

Method (MustDrop, arXiv 2411.10803, "local spatial merging"): tile the grid with non-overlapping windows;
a window's score is the mean cosine similarity over its ordered pairs of distinct members (self-pairs
excluded); every window scoring >= `threshold` collapses into one token, the size-weighted average of its
members, placed at the window's last member in raster order (its bottom-right cell). Other tokens pass
unchanged. Parameter-free, so it may run at inference only (the average stays in the
convex hull of code-embedding sums, which the LM was trained to read).

After liuting20/MustDrop@909afa5, `llava/model/multimodal_encoder/local_merge.py` (`conditional_pooling`,
`merge_wavg`), re-implemented from reading. Reference quirks deliberately not copied:
- r (the number of merged windows) is the *batch minimum* of the per-image counts, so an image's result
  depends on its batch neighbours; here every image merges exactly its own windows (variable counts are
  padded, `ReducedImageTokens.mask`), so a batch equals its images run one by one;
- the threshold tensor is created with `.cuda()` (fails on CPU): device-agnostic here;
- the grid is recovered with `int(sqrt(N))` and must be square and divisible by the window: here (h, w)
  is explicit and edge windows of a non-divisible grid are simply smaller (a 1-cell window never merges);
- output order is [CLS, merged windows in top-r order, unmerged ascending]: here all tokens stay in raster
  order of their slot (no CLS: UniCode has none), so the LM still reads the image top-left to bottom-right;
- the key set (top 8 % of ViT layer-23 CLS attention, never pruned) needs a ViT; UniCode's code embeddings
  have no CLS token or ViT attention, so there is no key set (a deviation from MustDrop, arXiv 2411.10803).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unicode_mllm.addons.token_reduction.config import MustDropMergeConfig
from unicode_mllm.addons.token_reduction.image_tokens import (
    VISION_REDUCERS,
    ReducedImageTokens,
    check_grid,
    pack_merged,
)


def window_members(grid_hw: tuple[int, int], window: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """(G, wh*ww) long raster indices of each window's members (raster order inside), -1 past the grid edge.

    Windows tile the grid from the top-left in raster order: G = ceil(h/wh) * ceil(w/ww).
    """
    h, w = grid_hw
    wh, ww = window
    gh, gw = math.ceil(h / wh), math.ceil(w / ww)
    rows = torch.arange(gh, device=device)[:, None] * wh + torch.arange(wh, device=device)[None, :]  # (gh, wh)
    cols = torch.arange(gw, device=device)[:, None] * ww + torch.arange(ww, device=device)[None, :]  # (gw, ww)
    r = rows[:, None, :, None].expand(gh, gw, wh, ww)
    c = cols[None, :, None, :].expand(gh, gw, wh, ww)
    members = torch.where((r < h) & (c < w), r * w + c, torch.full_like(r, -1))
    return members.reshape(gh * gw, wh * ww)


def window_scores(image_embeds: Tensor, members: Tensor) -> Tensor:
    """(n, s, c) embeddings + (G, K) window members -> (n, G) mean pairwise cosine, -inf for 1-cell windows."""
    x = torch.nn.functional.normalize(image_embeds.float(), dim=-1)  # (n, s, c), fp32: similarities near 1
    valid = members >= 0  # (G, K)
    xw = x[:, members.clamp(min=0)]  # (n, G, K, c)
    sims = torch.einsum("ngkc,ngjc->ngkj", xw, xw)  # (n, G, K, K)
    eye = torch.eye(members.shape[1], dtype=torch.bool, device=members.device)
    pairs = valid[:, :, None] & valid[:, None, :] & ~eye  # (G, K, K) ordered pairs of distinct members
    num_pairs = pairs.sum(dim=(-1, -2))  # (G,)
    total = (sims * pairs).sum(dim=(-1, -2))  # (n, G)
    score = total / num_pairs.clamp(min=1)
    return score.masked_fill(num_pairs == 0, float("-inf"))


@VISION_REDUCERS.register("mustdrop_merge")
def mustdrop_window_merge(
    image_embeds: Tensor, grid_hw: tuple[int, int], config: MustDropMergeConfig, sizes: Tensor | None = None
) -> ReducedImageTokens:
    """Merge every window whose mean pairwise cosine is >= `config.threshold` into its bottom-right cell.

    image_embeds: (n, h*w, c) raster order; sizes: (n, h*w) tokens each input already stands for (ones).
    Returns `ReducedImageTokens` with per-image counts h*w - sum over merged windows of (members - 1).
    A merged token is sum(size * x) / sum(size) over its window (fp32, cast back to the input dtype).
    Raises ValueError for a shape that does not match the grid.
    """
    h, w = check_grid(image_embeds, grid_hw)
    n, s, c = image_embeds.shape
    device = image_embeds.device
    members = window_members((h, w), config.window, device)  # (G, K)
    num_windows = members.shape[0]
    merged = window_scores(image_embeds, members) >= config.threshold  # (n, G)

    # The window of each cell and the window's representative (its last member in raster order).
    window_of_cell = torch.empty(s, dtype=torch.long, device=device)
    valid = members >= 0
    window_of_cell[members[valid]] = torch.arange(num_windows, device=device)[:, None].expand_as(members)[valid]
    representative = members.max(dim=-1).values  # (G,)
    raster = torch.arange(s, device=device).expand(n, s)
    target = torch.where(merged[:, window_of_cell], representative[window_of_cell].expand(n, s), raster)  # (n, s)

    size = torch.ones(n, s, device=device) if sizes is None else sizes.float()
    weighted = image_embeds.float() * size[..., None]
    summed = torch.zeros(n, s, c, device=device).scatter_add_(1, target[..., None].expand(n, s, c), weighted)
    mass = torch.zeros(n, s, device=device).scatter_add_(1, target, size)  # (n, s)
    keep = target == raster  # representatives and unmerged cells: (n, s)
    averaged = (summed / mass.clamp(min=1e-12)[..., None]).to(image_embeds.dtype)

    return pack_merged(averaged, keep, mass, target, (h, w))
