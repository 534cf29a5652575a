"""Pooling compressors: `pool2x` (LLaVA-OneVision), `deco_avgpool` (DeCo) and `ldpv2` (MobileVLM V2).

All three keep a raster output grid. `pool2x` and DeCo with `mlp_layers=0` have no parameters (they
average code embeddings, so they stay in the convex hull of code sums); the others train.
"""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from unicode_mllm.addons.compression.base import Compressor, register_compressor
from unicode_mllm.addons.compression.grid_layout import (
    ODD_GRID_POLICIES,
    OddGridPolicy,
    adaptive_pool_tokens,
    check_grid_hw,
    fit_grid_to_multiple,
    fitted_grid,
    tokens_to_map,
)
from unicode_mllm.errors import ConfigError

PoolMode = Literal["average", "max", "bilinear"]
POOL_MODES: tuple[str, ...] = ("average", "max", "bilinear")


def _check_target(name: str, target_grid: tuple[int, int] | list[int] | None) -> tuple[int, int]:
    if target_grid is None:
        raise ConfigError(f"compressor {name!r} needs target_grid (h', w'), e.g. (12, 12) as in the paper (576 -> 144)")
    try:
        return check_grid_hw(tuple(target_grid))
    except (TypeError, ValueError):
        raise ConfigError(f"compressor {name!r}: target_grid must be two positive ints, got {target_grid!r}") from None


def _check_target_fits(name: str, target: tuple[int, int], h: int, w: int) -> None:
    if target[0] > h or target[1] > w:
        raise ValueError(
            f"{name}: target_grid {target} is larger than the input grid {(h, w)} on some side; adaptive pooling "
            "would repeat tokens instead of compressing"
        )


@register_compressor("pool2x")
class Pool2x(Compressor):
    """Parameter-free s x s pooling of the code grid, after LLaVA-OneVision's `get_2dPool`.

    (b, h*w, c) -> (b, h'*w', c), c = llm_width.
    mode 'bilinear' (OneVision's default for video): F.interpolate to (ceil(h/s), ceil(w/s)),
        align_corners=False, no antialias; any grid works (27x27 -> 14x14).
    mode 'average' / 'max': s x s windows. A side not divisible by s follows `odd_grid`: 'error' (default)
        raises, 'crop' drops the trailing rows/columns as the reference's floor does (27x27 -> 13x13),
        'pad' repeats the last row/column (for s = 2 this is the mean/max of the cells that exist) and
        gives (ceil(h/s), ceil(w/s)).
    """

    def __init__(self, llm_width: int, mode: PoolMode = "bilinear", stride: int = 2, odd_grid: OddGridPolicy = "error"):
        super().__init__(llm_width, llm_width)
        if mode not in POOL_MODES:
            raise ConfigError(f"pool2x mode {mode!r} is unknown; choose one of {list(POOL_MODES)}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 2:
            raise ConfigError(f"pool2x stride must be an int >= 2, got {stride!r}")
        if odd_grid not in ODD_GRID_POLICIES:
            raise ConfigError(f"pool2x odd_grid {odd_grid!r} is unknown; choose one of {list(ODD_GRID_POLICIES)}")
        self.mode = mode
        self.stride = stride
        self.odd_grid = odd_grid

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        s = self.stride
        if self.mode == "bilinear":
            return (math.ceil(h / s), math.ceil(w / s))
        return fitted_grid((h, w), s, self.odd_grid, f"pool2x(mode={self.mode!r})")

    def _compress(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        h, w = grid_hw
        if self.mode == "bilinear":
            fmap = rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w)
            out = F.interpolate(fmap, size=self.output_grid(h, w), mode="bilinear", align_corners=False)
        else:
            fmap = fit_grid_to_multiple(tokens_to_map(tokens, grid_hw), self.stride, self.odd_grid, "pool2x")
            fmap = rearrange(fmap, "b h w c -> b c h w")
            pool = F.avg_pool2d if self.mode == "average" else F.max_pool2d
            out = pool(fmap, kernel_size=self.stride, stride=self.stride)
        return rearrange(out, "b c h w -> b (h w) c")


def _mlp(in_width: int, out_width: int, layers: int) -> nn.Module:
    """Linear(in, out) + (layers - 1) x [GELU (exact erf), Linear(out, out)]; layers = 0 -> identity."""
    if layers == 0:
        return nn.Identity()
    modules: list[nn.Module] = [nn.Linear(in_width, out_width)]
    for _ in range(1, layers):
        modules += [nn.GELU(), nn.Linear(out_width, out_width)]
    return nn.Sequential(*modules)


@register_compressor("deco_avgpool")
class DecoAvgPool(Compressor):
    """DeCo's `AvgPoolProjector` (arXiv 2405.20985): 2-D adaptive average pooling, then an MLP.

    (b, h*w, c_in) -> pool to target_grid (h', w') -> (b, h'*w', c_in) -> MLP -> (b, h'*w', llm_width).
    mlp_layers: DeCo's `layer_num` (Linear + (n-1) x [GELU, Linear]); 0 = pool only (parameter-free,
        needs input_width == llm_width). input_width: c_in, default llm_width (UniCode reads code embeddings).
    Non-divisible sizes use overlapping adaptive windows (6 -> 4: [0,2) [1,3) [3,5) [4,6)).
    """

    def __init__(
        self,
        llm_width: int,
        target_grid: tuple[int, int] | None = None,
        mlp_layers: int = 2,
        input_width: int | None = None,
    ):
        in_width = llm_width if input_width is None else input_width
        super().__init__(in_width, llm_width)
        self.target_grid = _check_target("deco_avgpool", target_grid)
        if isinstance(mlp_layers, bool) or not isinstance(mlp_layers, int) or mlp_layers < 0:
            raise ConfigError(f"deco_avgpool mlp_layers must be an int >= 0, got {mlp_layers!r}")
        if mlp_layers == 0 and in_width != llm_width:
            raise ConfigError(
                f"deco_avgpool with mlp_layers=0 cannot map input_width {in_width} to llm_width {llm_width}"
            )
        self.mlp = _mlp(in_width, llm_width, mlp_layers)

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        _check_target_fits("deco_avgpool", self.target_grid, h, w)
        return self.target_grid

    def _compress(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        pooled = adaptive_pool_tokens(tokens, grid_hw, self.target_grid)  # (b, h'*w', c_in): pool BEFORE the MLP
        return self.mlp(pooled)


@register_compressor("ldpv2")
class Ldpv2(Compressor):
    """MobileVLM V2's `LDPNetV2Projector`: MLP, adaptive average pooling, depthwise-conv position encoding.

    (b, h*w, c_in) -> Linear(c_in, c) -> GELU -> Linear(c, c) on every token (MLP BEFORE pooling, unlike DeCo)
    -> adaptive pool to target_grid (b, h'*w', c) -> x + DepthwiseConv3x3(x) (Twins PEG: kernel 3, stride 1,
    zero padding 1, groups = c, with bias) -> (b, h'*w', c), c = llm_width.
    Setting the PEG weight and bias to zero makes the last stage an identity.
    """

    def __init__(self, llm_width: int, target_grid: tuple[int, int] | None = None, input_width: int | None = None):
        in_width = llm_width if input_width is None else input_width
        super().__init__(in_width, llm_width)
        self.target_grid = _check_target("ldpv2", target_grid)
        self.mlp = _mlp(in_width, llm_width, 2)
        self.peg = nn.Conv2d(llm_width, llm_width, kernel_size=3, stride=1, padding=1, groups=llm_width, bias=True)

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        _check_target_fits("ldpv2", self.target_grid, h, w)
        return self.target_grid

    def _compress(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        feats = self.mlp(tokens)  # (b, h*w, c)
        pooled = adaptive_pool_tokens(feats, grid_hw, self.target_grid)  # (b, h'*w', c)
        th, tw = self.target_grid
        fmap = rearrange(pooled, "b (h w) c -> b c h w", h=th, w=tw)
        fmap = fmap + self.peg(fmap)  # residual position injection
        return rearrange(fmap, "b c h w -> b (h w) c")
