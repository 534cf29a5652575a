"""A fixed 2-D sine-cosine position table for raster token grids.

Code embeddings carry no 2-D position (the LLM only adds its 1-D RoPE index later), so a compressor
whose output does not keep the grid (Q-Former, Perceiver) would be blind to layout: cross-attention is
invariant to permuting its keys. Adding this table to the visual tokens first restores the layout.

Layout (after the MAE / ViT-style 2-D sin-cos embedding): channels [0, c/2) encode the row i, channels
[c/2, c) the column j; each half is [sin(pos * omega_k), cos(pos * omega_k)] with
omega_k = 10000 ** (-k / (c/4)), k = 0 .. c/4 - 1.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sincos_1d(positions: Tensor, width: int) -> Tensor:
    """(n,) float positions -> (n, width) [sin | cos] features; width even."""
    omega = torch.arange(width // 2, dtype=torch.float64) / (width / 2.0)
    omega = 1.0 / (10000.0**omega)  # (width/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (n, width/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(grid_hw: tuple[int, int], width: int) -> Tensor:
    """Fixed position table for a raster grid: (h*w, width) fp32, values in [-1, 1].

    Row p = i*w + j holds [rows(i) | cols(j)]. Raises ValueError unless width is a positive multiple of 4.
    """
    if width < 4 or width % 4:
        raise ValueError(f"a 2-D sin-cos position table needs a width divisible by 4; got {width}")
    h, w = grid_hw
    rows = _sincos_1d(torch.arange(h), width // 2)  # (h, width/2)
    cols = _sincos_1d(torch.arange(w), width // 2)  # (w, width/2)
    table = torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], dim=-1)
    return table.reshape(h * w, width).to(torch.float32)
