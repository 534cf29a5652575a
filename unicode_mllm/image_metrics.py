"""Per-image reconstruction metrics on pixels in [-1, 1]."""

from __future__ import annotations

import torch
from torch import Tensor


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """(b, c, h, w) pixels in [-1, 1] -> (b,) PSNR in dB on the [0, 1] scale (peak 1)."""
    a = (x.float().clamp(-1, 1) + 1) / 2
    b = (y.float().clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)
