"""Index operations on raster token grids and on (b, c, H, W) maps, shared by compressors and view generators.

einops letters: `b` batch, `h w` grid, `c` channels. A token sequence (b, h*w, c) is always in
raster order (index p = i*w + j for row i, column j) and its grid is passed explicitly, never inferred
from a square root.

Functions here are pure index/reshape operations (bitwise exact) except `adaptive_pool_tokens` (a mean).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

OddGridPolicy = Literal["error", "pad", "crop"]
ODD_GRID_POLICIES: tuple[str, ...] = ("error", "pad", "crop")


def check_grid_hw(grid_hw: tuple[int, int] | list[int]) -> tuple[int, int]:
    """Return `grid_hw` as a (h, w) tuple of positive ints; raises ValueError otherwise."""
    if len(grid_hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in grid_hw):
        raise ValueError(f"grid_hw must be two positive ints (h, w); got {grid_hw!r}")
    return int(grid_hw[0]), int(grid_hw[1])


def check_tokens(tokens: Tensor, grid_hw: tuple[int, int], width: int | None = None) -> tuple[int, int]:
    """Check that `tokens` is (b, h*w, width) for `grid_hw`; return (h, w). Raises ValueError with the shapes."""
    h, w = check_grid_hw(grid_hw)
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (b, h*w, c); got shape {tuple(tokens.shape)}")
    if tokens.shape[1] != h * w:
        raise ValueError(f"tokens hold {tokens.shape[1]} positions but grid_hw={(h, w)} has h*w={h * w}")
    if width is not None and tokens.shape[2] != width:
        raise ValueError(f"tokens have width {tokens.shape[2]}, this module expects {width}")
    return h, w


def tokens_to_map(tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """(b, h*w, c) raster tokens -> (b, h, w, c)."""
    h, w = grid_hw
    return rearrange(tokens, "b (h w) c -> b h w c", h=h, w=w)


def _odd_grid_error(grid_hw: tuple[int, int], factor: int, what: str) -> ValueError:
    return ValueError(
        f"{what} merges {factor}x{factor} windows and needs grid sides divisible by {factor}; got grid_hw="
        f"{tuple(grid_hw)} (set odd_grid='pad' to repeat the last row/column or 'crop' to drop it)"
    )


def fitted_grid(
    grid_hw: tuple[int, int], factor: int, policy: OddGridPolicy, what: str = "this compressor"
) -> tuple[int, int]:
    """The merged grid (h', w') after `fit_grid_to_multiple` and factor x factor windows. Raises like it.

    'error': exact division or ValueError; 'pad': ceil(side / factor); 'crop': floor(side / factor).
    """
    if policy not in ODD_GRID_POLICIES:
        raise ValueError(f"odd_grid {policy!r} is unknown; choose one of {list(ODD_GRID_POLICIES)}")
    h, w = grid_hw
    if h % factor == 0 and w % factor == 0:
        return (h // factor, w // factor)
    if policy == "error":
        raise _odd_grid_error(grid_hw, factor, what)
    if policy == "crop":
        if h < factor or w < factor:
            raise ValueError(
                f"odd_grid='crop' leaves nothing of grid_hw={tuple(grid_hw)} with {factor}x{factor} windows"
            )
        return (h // factor, w // factor)
    return (-(-h // factor), -(-w // factor))


def fit_grid_to_multiple(fmap: Tensor, factor: int, policy: OddGridPolicy, what: str = "this compressor") -> Tensor:
    """Make both sides of a (b, h, w, c) map divisible by `factor`.

    policy 'error' raises ValueError; 'pad' repeats the last row/column (edge replication, so the padded
    cells stay copies of real tokens); 'crop' drops the trailing rows/columns (LLaVA-OneVision's floor).
    Returns (b, h', w', c) with h' = ceil(h/factor)*factor ('pad') or floor(h/factor)*factor ('crop').
    """
    h, w = fmap.shape[1], fmap.shape[2]
    out_h, out_w = fitted_grid((h, w), factor, policy, what)
    if policy == "crop":
        return fmap[:, : out_h * factor, : out_w * factor]
    pad_h, pad_w = out_h * factor - h, out_w * factor - w
    if pad_h:
        fmap = torch.cat([fmap, fmap[:, -1:].expand(-1, pad_h, -1, -1)], dim=1)
    if pad_w:
        fmap = torch.cat([fmap, fmap[:, :, -1:].expand(-1, -1, pad_w, -1)], dim=2)
    return fmap


def gather_2x2(fmap: Tensor) -> Tensor:
    """Concatenate each 2x2 neighbourhood of a (b, h, w, c) map (h, w even) -> (b, h/2, w/2, 4c).

    Channel block q = 2*di + dj holds x[2i + di, 2j + dj]: top-left, top-right, bottom-left, bottom-right.
    This is InternVL's pixel shuffle v2 layout and the order Qwen2-VL's processor emits (block-major).
    """
    assert fmap.shape[1] % 2 == 0 and fmap.shape[2] % 2 == 0, f"gather_2x2 needs even sides, got {tuple(fmap.shape)}"
    return rearrange(fmap, "b (h p) (w q) c -> b h w (p q c)", p=2, q=2)


def adaptive_pool_tokens(tokens: Tensor, grid_hw: tuple[int, int], target_hw: tuple[int, int]) -> Tensor:
    """2-D adaptive average pooling of raster tokens: (b, h*w, c) -> (b, th*tw, c), raster over target_hw.

    Output cell (i, j) is the mean over rows [floor(i*h/th), ceil((i+1)*h/th)) and the same for columns
    (windows overlap when th does not divide h, e.g. 6 -> 4 gives [0,2) [1,3) [3,5) [4,6)).
    """
    h, w = grid_hw
    fmap = rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w)
    pooled = F.adaptive_avg_pool2d(fmap, target_hw)
    return rearrange(pooled, "b c h w -> b (h w) c")


def _check_divisible(x: Tensor, n: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a (b, c, H, W) tensor, got shape {tuple(x.shape)}")
    if n < 1 or x.shape[2] % n or x.shape[3] % n:
        raise ValueError(f"cannot split a {x.shape[2]}x{x.shape[3]} map into {n}x{n} parts: both sides must divide")


# How part (i, j) of an n x n split sits in the (b, c, H, W) map: a contiguous block, or every n-th row and column.
_BLOCKS = "b c (i h) (j w)"
_STRIDED = "b c (h i) (w j)"


def _split(x: Tensor, n: int, layout: str) -> Tensor:
    _check_divisible(x, n)
    return rearrange(x, f"{layout} -> (i j) b c h w", i=n, j=n)


def _merge(parts: Tensor, n: int, layout: str, what: str) -> Tensor:
    if parts.ndim != 5 or parts.shape[0] != n * n:
        raise ValueError(f"expected ({n * n}, b, c, h, w) {what}, got shape {tuple(parts.shape)}")
    return rearrange(parts, f"(i j) b c h w -> {layout}", i=n, j=n)


def split_blocks(x: Tensor, n: int) -> Tensor:
    """Non-overlapping n x n tiles, row-major: (b, c, H, W) -> (n*n, b, c, H/n, W/n).

    out[i*n + j] = x[:, :, i*H/n:(i+1)*H/n, j*W/n:(j+1)*W/n] (INF-LLaVA's local view, S^2's chessboard).
    """
    return _split(x, n, _BLOCKS)


def merge_blocks(blocks: Tensor, n: int) -> Tensor:
    """Inverse of `split_blocks`: (n*n, b, c, h, w) -> (b, c, n*h, n*w)."""
    return _merge(blocks, n, _BLOCKS, "tiles")


def split_strided(x: Tensor, n: int) -> Tensor:
    """Strided (decimated) sub-maps: (b, c, H, W) -> (n*n, b, c, H/n, W/n), out[a*n + e] = x[:, :, a::n, e::n].

    Each sub-map spans the whole image with every n-th row and column (INF-LLaVA's global view).
    """
    return _split(x, n, _STRIDED)


def merge_strided(subs: Tensor, n: int) -> Tensor:
    """Inverse of `split_strided`: (n*n, b, c, h, w) -> (b, c, n*h, n*w), interleaving the sub-maps."""
    return _merge(subs, n, _STRIDED, "sub-maps")
