"""Image decompression targets: the order in which the LLM writes an image's h*w*d code token ids.

The written form of an image is `<img>` + h*w*d ids + `</img>`, the ids in raster order over the
(h, w) grid and depth-first within a position: position (0, 0) depths 0..d-1, then (0, 1), ... For the
decompression task the sequence is cut into T segments of whole positions, one assistant turn each
(the reference code uses one top-grid row per segment, T = h). The first segment opens with `<img>`
and the last closes with `</img>`, so the assistant turns joined are exactly the written form.

The functions here work on LLM token ids (or codes: the order is the same) and never on text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor


def _check_grid(grid: Tensor, code_shape: Sequence[int] | None = None) -> None:
    if grid.ndim != 3:
        raise ValueError(f"an image's ids must be (h, w, d), got {tuple(grid.shape)}")
    if code_shape is not None and tuple(grid.shape) != tuple(code_shape):
        raise ValueError(
            f"an image's ids are {tuple(grid.shape)} but the visual tokenizer's code_shape is {tuple(code_shape)}"
        )


def grid_to_sequence(grid: Tensor) -> Tensor:
    """(..., h, w, d) ids -> (..., h*w*d): raster order over positions, depth-first within one."""
    return rearrange(grid, "... h w d -> ... (h w d)")


def sequence_to_grid(sequence: Tensor, code_shape: Sequence[int]) -> Tensor:
    """(..., h*w*d) ids -> (..., h, w, d), the inverse of `grid_to_sequence`.

    Raises ValueError when the length is not h*w*d.
    """
    h, w, d = code_shape
    if sequence.shape[-1] != h * w * d:
        raise ValueError(f"an image needs h*w*d = {h}*{w}*{d} = {h * w * d} ids, got {sequence.shape[-1]}")
    return rearrange(sequence, "... (h w d) -> ... h w d", h=h, w=w, d=d)


def check_num_segments(code_shape: Sequence[int], num_segments: int) -> None:
    """Raise ValueError unless T divides the h*w positions (a segment holds whole positions)."""
    h, w, _ = code_shape
    if num_segments < 1 or (h * w) % num_segments:
        raise ValueError(
            f"decompression segments T={num_segments} must divide the h*w = {h}*{w} = {h * w} positions "
            f"(T = h = {h} gives one grid row per segment)"
        )


def split_into_segments(grid: Tensor, num_segments: int) -> list[Tensor]:
    """(h, w, d) ids -> T tensors of (h*w*d / T,) ids, in writing order. Raises ValueError for a bad T."""
    _check_grid(grid)
    check_num_segments(grid.shape, num_segments)
    return list(grid_to_sequence(grid).chunk(num_segments))


def segments_to_grid(segments: Sequence[Tensor], code_shape: Sequence[int]) -> Tensor:
    """The inverse of `split_into_segments`: T id tensors (any lengths that add up) -> (h, w, d).

    Raises ValueError when the segments do not hold exactly h*w*d ids.
    """
    if not segments:
        raise ValueError("no segments to join")
    return sequence_to_grid(torch.cat([s.reshape(-1) for s in segments]), code_shape)
