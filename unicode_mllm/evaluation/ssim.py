"""Structural similarity (SSIM) of image batches, in torch.

After Wang, Bovik, Sheikh and Simoncelli, "Image quality assessment: from error visibility to
structural similarity" (IEEE TIP 2004), with the paper's settings: an 11x11 Gaussian window with
sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample) covariances, computed per channel on the
[0, 1] scale (data range 1) and averaged over the positions where the window fits inside the image
and over channels. These are the settings of `skimage.metrics.structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)`, which the tests
compare against: skimage filters the whole image and then drops a 5-pixel border, which equals the
"valid" convolution used here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

WINDOW_SIZE = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = SIGMA, dtype: torch.dtype = torch.float64) -> Tensor:
    """(size, size) normalised Gaussian weights (the outer product of two 1-D Gaussians)."""
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """(b, c, h, w) pixels in [-1, 1] -> (b,) mean SSIM on the [0, 1] scale, computed in fp32.

    Raises ValueError when the shapes differ or an image side is under 11 pixels (the window must fit).
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (b, c, h, w) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    _, c, h, w = x.shape
    if min(h, w) < WINDOW_SIZE:
        raise ValueError(f"ssim needs images of at least {WINDOW_SIZE}x{WINDOW_SIZE} pixels, got {h}x{w}")
    a = (x.float().clamp(-1, 1) + 1) / 2
    b = (y.float().clamp(-1, 1) + 1) / 2
    window = gaussian_window(dtype=torch.float32).to(a.device).expand(c, 1, WINDOW_SIZE, WINDOW_SIZE)

    def blur(t: Tensor) -> Tensor:  # depthwise "valid" filtering: (b, c, h, w) -> (b, c, h - 10, w - 10)
        return F.conv2d(t, window, groups=c)

    with torch.autocast(device_type=a.device.type, enabled=False):
        mu_a, mu_b = blur(a), blur(b)
        var_a = blur(a * a) - mu_a**2
        var_b = blur(b * b) - mu_b**2
        cov = blur(a * b) - mu_a * mu_b
        c1, c2 = K1**2, K2**2  # (K * data_range)^2 with data range 1
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
