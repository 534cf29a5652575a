"""2x2 concat-and-project compressors: InternVL's pixel shuffle + `mlp1` and Qwen2-VL's `PatchMerger`.

Both concatenate the 4 tokens of each 2x2 window of the (h, w) grid into one 4c vector (lossless before
the MLP) and project it to the LLM width: 4x fewer tokens. The window is gathered from the raster grid
(tokens (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)), never as 4 consecutive raster tokens.
"""

from __future__ import annotations

from typing import Literal

from einops import rearrange
from torch import Tensor, nn

from unicode_mllm.addons.compression.base import Compressor, register_compressor
from unicode_mllm.addons.compression.grid_layout import (
    ODD_GRID_POLICIES,
    OddGridPolicy,
    fit_grid_to_multiple,
    fitted_grid,
    gather_2x2,
    tokens_to_map,
)
from unicode_mllm.errors import ConfigError

PixelShuffleVersion = Literal["v1", "v2"]


def internvl_pixel_shuffle(fmap: Tensor, version: PixelShuffleVersion) -> Tensor:
    """InternVL's `pixel_shuffle(x, scale_factor=0.5)` on a (b, A, B, c) map with even A, B (A = rows).

    v2: (b, A/2, B/2, 4c), out[:, i, j, q*c:(q+1)*c] = x[:, 2i + di, 2j + dj] with q = 2*di + dj.
    v1: the same tokens spatially transposed, (b, B/2, A/2, 4c): InternVL's v1 never swaps the axes back.
    Raises ValueError for an odd side.
    """
    if fmap.ndim != 4 or fmap.shape[1] % 2 or fmap.shape[2] % 2:
        raise ValueError(f"pixel shuffle needs a (b, A, B, c) map with even A and B; got shape {tuple(fmap.shape)}")
    if version not in ("v1", "v2"):
        raise ValueError(f"pixel shuffle version {version!r} is unknown; choose 'v1' or 'v2'")
    out = gather_2x2(fmap)
    return out.transpose(1, 2) if version == "v1" else out


class _ConcatMerge2x2(Compressor):
    """Shared grid handling: odd sides follow `odd_grid` ('error' | 'pad' | 'crop', see grid_layout)."""

    def __init__(self, in_width: int, out_width: int, odd_grid: OddGridPolicy):
        super().__init__(in_width, out_width)
        if odd_grid not in ODD_GRID_POLICIES:
            raise ConfigError(f"{self.name} odd_grid {odd_grid!r} is unknown; choose one of {list(ODD_GRID_POLICIES)}")
        self.odd_grid = odd_grid

    def _merged_grid(self, h: int, w: int) -> tuple[int, int]:
        return fitted_grid((h, w), 2, self.odd_grid, self.name)

    def _fitted_map(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """(b, h*w, c) -> (b, h2, w2, c) with even sides (odd_grid applied)."""
        return fit_grid_to_multiple(tokens_to_map(tokens, grid_hw), 2, self.odd_grid, self.name)


@register_compressor("internvl_ps")
class InternVLPixelShuffle(_ConcatMerge2x2):
    """InternVL 1.1+ pixel shuffle (scale 0.5) + `mlp1`: LayerNorm(4c) -> Linear(4c, C) -> GELU -> Linear(C, C).

    (b, h*w, c_in) -> (b, h/2 * w/2, C), C = llm_width; the norm acts on the concatenated 4c vector.
    ps_version 'v2' (default) keeps the grid: output grid (h/2, w/2). 'v1' reproduces checkpoints trained
    with InternVL's transposed layout: output grid (w/2, h/2), raster over the transposed image.
    input_width: c_in, default llm_width.
    """

    def __init__(
        self,
        llm_width: int,
        ps_version: PixelShuffleVersion = "v2",
        odd_grid: OddGridPolicy = "error",
        input_width: int | None = None,
    ):
        in_width = llm_width if input_width is None else input_width
        super().__init__(in_width, llm_width, odd_grid)
        if ps_version not in ("v1", "v2"):
            raise ConfigError(f"internvl_ps ps_version {ps_version!r} is unknown; choose 'v1' or 'v2'")
        self.ps_version = ps_version
        self.norm = nn.LayerNorm(4 * in_width)
        self.mlp = nn.Sequential(nn.Linear(4 * in_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        h2, w2 = self._merged_grid(h, w)
        return (w2, h2) if self.ps_version == "v1" else (h2, w2)

    def shuffle(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """The parameter-free stage: (b, h*w, c_in) -> (b, n, 4*c_in) raster over `output_grid`."""
        out = internvl_pixel_shuffle(self._fitted_map(tokens, grid_hw), self.ps_version)
        return rearrange(out, "b h w c -> b (h w) c")

    def _compress(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        return self.mlp(self.norm(self.shuffle(tokens, grid_hw)))


@register_compressor("qwen2vl_merger")
class Qwen2VLMerger(_ConcatMerge2x2):
    """Qwen2-VL's `PatchMerger` (spatial_merge_size 2) with the 2x2 gather done on the raster grid.

    (b, h*w, c_in) -> LayerNorm(c_in, eps 1e-6) per token -> concat each 2x2 window (TL, TR, BL, BR)
    -> (b, h/2 * w/2, 4c_in) -> Linear(4c_in, 4c_in) -> GELU -> Linear(4c_in, C) -> (b, h/2 * w/2, C).
    The HF module itself only reshapes (-1, 4c) and relies on the image processor's block-major patch
    order; on raster tokens that reshape would join a 1x4 strip, so the gather is explicit here.
    """

    def __init__(self, llm_width: int, odd_grid: OddGridPolicy = "error", input_width: int | None = None):
        in_width = llm_width if input_width is None else input_width
        super().__init__(in_width, llm_width, odd_grid)
        self.norm = nn.LayerNorm(in_width, eps=1e-6)
        hidden = 4 * in_width
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, llm_width))

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        return self._merged_grid(h, w)

    def gather(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """Normalise per token, then concatenate 2x2 windows: (b, h*w, c_in) -> (b, h/2 * w/2, 4*c_in)."""
        fmap = self._fitted_map(self.norm(tokens), grid_hw)
        return rearrange(gather_2x2(fmap), "b h w c -> b (h w) c")

    def _compress(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        return self.mlp(self.gather(tokens, grid_hw))
