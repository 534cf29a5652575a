"""`ReducedImageTokens`: the result of a vision-stage reduction, with the map back to the (h, w) grid.

Every vision-stage method returns the same structure, so the prompt builder (`sequence.py`) needs to know
nothing about the method. Per-image counts may differ (threshold merges): images are padded
to the batch's largest count and `mask` marks the real slots; padding is never shown to the LM.

`VISION_REDUCERS` registers the methods by their `vision` name: functions `(image_embeds, grid_hw, config)`
-> `ReducedImageTokens`, where config is the method's section of `TokenReductionConfig` (the package
`__init__` imports them all).

Also here: `compact_rows`, the one helper that turns a (b, L) keep mask into a left-padded gather index; the
vision and LLM stages both use it, so the two stages share one padding convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from unicode_mllm.registry import Registry

VISION_REDUCERS: Registry = Registry("vision reduction", size_args=("image_embeds", "grid_hw", "config"))


@dataclass
class ReducedImageTokens:
    """Reduced image embeddings plus the mapping to the original raster grid.

    tokens: (n, m, c) reduced embeddings, m = the largest per-image count; padding slots are zeros.
    mask: (n, m) bool, True for real slots; real slots come first, in ascending `src_index` order.
    src_index: (n, m) long, the raster index p = i*w + j of the grid cell whose prompt slot (and, under
        `keep_original`, RoPE position) the token takes; -1 on padding. Unique per image.
    sizes: (n, m) float, how many original tokens the slot stands for (0 on padding).
    assignment: (n, h*w) long, for every original token the slot in [0, m) it was folded into, or -1 when
        it was dropped without being merged anywhere.
    grid_hw: the (h, w) grid the input came from.
    """

    tokens: Tensor
    mask: Tensor
    src_index: Tensor
    sizes: Tensor
    assignment: Tensor
    grid_hw: tuple[int, int]

    @property
    def counts(self) -> Tensor:
        """(n,) long: real tokens per image."""
        return self.mask.sum(dim=-1)

    def check(self) -> None:
        """Internal invariants (shapes and index ranges); raises AssertionError with the shapes."""
        n, m, _ = self.tokens.shape
        h, w = self.grid_hw
        assert self.mask.shape == (n, m) and self.src_index.shape == (n, m) and self.sizes.shape == (n, m), (
            f"tokens {tuple(self.tokens.shape)}, mask {tuple(self.mask.shape)}, src_index "
            f"{tuple(self.src_index.shape)}, sizes {tuple(self.sizes.shape)}"
        )
        assert self.assignment.shape == (n, h * w), f"assignment {tuple(self.assignment.shape)} for grid {h}x{w}"
        assert bool(((self.src_index >= 0) == self.mask).all()), "src_index must be >= 0 exactly on real slots"
        assert bool((self.mask[:, 1:] <= self.mask[:, :-1]).all()), "real slots must come before the padding"
        rising = (self.src_index[:, 1:] > self.src_index[:, :-1]) | ~self.mask[:, 1:]
        assert bool(rising.all()), "real slots must be in ascending src_index order"
        assert bool((self.assignment < m).all()), f"assignment points past the {m} slots"


def identity_reduction(image_embeds: Tensor, grid_hw: tuple[int, int]) -> ReducedImageTokens:
    """(n, h*w, c) -> every token kept in raster order (what a switched-off reducer returns)."""
    n, s, _ = image_embeds.shape
    raster = torch.arange(s, device=image_embeds.device).expand(n, s)
    return ReducedImageTokens(
        tokens=image_embeds,
        mask=torch.ones(n, s, dtype=torch.bool, device=image_embeds.device),
        src_index=raster.clone(),
        sizes=torch.ones(n, s, dtype=torch.float32, device=image_embeds.device),
        assignment=raster.clone(),
        grid_hw=grid_hw,
    )


def check_grid(image_embeds: Tensor, grid_hw: tuple[int, int]) -> tuple[int, int]:
    """Raise ValueError unless `image_embeds` is (n, h*w, c) for the given grid; returns (h, w)."""
    if image_embeds.ndim != 3:
        raise ValueError(f"image embeddings must be (n, h*w, c), got {tuple(image_embeds.shape)}")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if h < 1 or w < 1 or image_embeds.shape[1] != h * w:
        raise ValueError(f"image embeddings hold {image_embeds.shape[1]} tokens per image, grid {h}x{w} needs {h * w}")
    return h, w


def compact_rows(keep: Tensor) -> tuple[Tensor, Tensor]:
    """(b, L) bool keep mask -> gather index (b, L') long and validity (b, L') bool, left-padded.

    L' is the largest per-row count. Row r's kept columns keep their order and end at the right edge;
    the index is -1 on the padding on the left. Gather with `index.clamp(min=0)` and mask with `valid`.
    """
    counts = keep.sum(dim=-1)  # (b,)
    width = int(counts.max()) if keep.numel() else 0
    b = keep.shape[0]
    index = torch.full((b, width), -1, dtype=torch.long, device=keep.device)
    slot = (width - counts)[:, None] + keep.long().cumsum(dim=-1) - 1  # (b, L): target slot of a kept column
    rows, cols = keep.nonzero(as_tuple=True)
    index[rows, slot[rows, cols]] = cols
    return index, index >= 0


def gather_rows(x: Tensor, index: Tensor, fill: float | int | bool = 0) -> Tensor:
    """x (b, L, ...) gathered along dim 1 with a (b, L') index that is -1 on padding (filled with `fill`)."""
    safe = index.clamp(min=0)
    expanded = safe.view(*safe.shape, *([1] * (x.ndim - 2))).expand(*safe.shape, *x.shape[2:])
    out = x.gather(1, expanded)
    pad = (index < 0).view(*index.shape, *([1] * (x.ndim - 2)))
    return out.masked_fill(pad, fill)


def pack_by_mask(values: Tensor, keep: Tensor, order: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """values (n, s, ...) with keep (n, s) -> right-padded (n, m, ...) of the kept entries and their (n, m) index.

    Entries keep their column order (or ascending `order` (n, s) when given). The index is -1 on padding.
    Used for image-level packing, where real slots come first (right padding): unlike prompt rows, image
    slots are scattered back into placeholder spans, so their padding never reaches the LM.
    """
    n, s = keep.shape
    key = torch.arange(s, device=keep.device).expand(n, s) if order is None else order
    big = torch.iinfo(torch.long).max
    sort_key = torch.where(keep, key.long(), torch.full_like(key, big, dtype=torch.long))
    perm = sort_key.argsort(dim=-1, stable=True)  # kept entries first, in key order
    width = int(keep.sum(dim=-1).max()) if keep.numel() else 0
    perm = perm[:, :width]
    valid = keep.gather(1, perm)
    index = torch.where(valid, perm, torch.full_like(perm, -1))
    return gather_rows(values, index), index


def slots_of_cells(src_index: Tensor, num_cells: int) -> Tensor:
    """Inverse of a (n, m) `src_index` (-1 on padding): (n, num_cells) long, the slot holding each grid cell's
    token, -1 for a cell that holds no slot."""
    out = torch.full((src_index.shape[0], num_cells), -1, dtype=torch.long, device=src_index.device)
    rows, slots = (src_index >= 0).nonzero(as_tuple=True)
    out[rows, src_index[rows, slots]] = slots
    return out


def pack_merged(
    merged: Tensor, keep: Tensor, sizes: Tensor, destination: Tensor, grid_hw: tuple[int, int]
) -> ReducedImageTokens:
    """The result of a merge on the grid: each kept cell becomes a slot, every cell is assigned to its destination's.

    merged: (n, h*w, c) cell values after merging; keep: (n, h*w) bool, the cells that stay (in raster order);
    sizes: (n, h*w) float, original tokens each cell's value stands for; destination: (n, h*w) long, the kept
    cell each cell was merged into (itself when kept).
    """
    tokens, src_index = pack_by_mask(merged, keep)  # (n, m, c), (n, m) in raster order of the slots
    return ReducedImageTokens(
        tokens=tokens,
        mask=src_index >= 0,
        src_index=src_index,
        sizes=gather_rows(sizes[..., None], src_index)[..., 0],
        assignment=slots_of_cells(src_index, keep.shape[1]).gather(1, destination),
        grid_hw=grid_hw,
    )
