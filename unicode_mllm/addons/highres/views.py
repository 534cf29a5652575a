"""High-resolution view generators: one image -> several encoder views -> one set of feature tokens.

`encode` is any function from pixels (b, 3, H, W) at the encoder's native `view_size` (H, W) to features
(b, h*w, c) on the encoder's `view_grid` (h, w), raster order: in UniCode, the visual tokenizer's aggregated
code embeddings (c = the LLM width); in tests, a small deterministic function. A generator resizes the
input image itself (bicubic in (at least) fp32, align_corners=False, antialias off by default as in the references),
calls `encode` on the views (batched on the first axis), and returns `ViewFeatures`:

- `single`: the image resized to view_size, encoded once. Grid: view_grid.
- `s2` (S^2, arXiv 2403.13043, after bfshi/scaling_on_scales@31688b1 s2wrapper/core.py `forward` and
  utils.py `split_chessboard`/`merge_chessboard`): for each integer scale s (ascending) the image is
  resized to s*view_size, split into s x s view-size tiles (chessboard, row-major), each tile encoded,
  the tiles' grids merged into one (s*h, s*w) map, and that map area-pooled to the first scale's grid
  (s0*h, s0*w). merge='channel' concatenates the scales on channels as S^2 does -> (b, s0^2*h*w, k*c)
  (a projector must then map k*c -> c); merge='token' (UniCode's default, as in MustDrop's `s2_manner`)
  concatenates them on the sequence -> (b, k*s0^2*h*w, c), one grid per scale.
  Deviations: scales are integer factors of view_size (S^2 also accepts sizes it re-rounds to a multiple of
  the split size with a second bicubic resize); no prefix (CLS) tokens.
- `inf_llava` (INF-LLaVA, see dual_perspective.py): the image resized to n*view_size gives n*n local tiles
  and n*n strided global sub-images; with the image resized to view_size that is 2*n*n + 1 views. The DEM
  fuses the 2*n*n into one view_grid map, and the output is the mean of that map and the base view:
  (b, h*w, c), trainable (the DEM).

`compress_view_features` applies a compressor to each grid of a `ViewFeatures` and concatenates.

Every generator also splits its `forward` into `make_views(images) -> (v, b, 3, H, W)` (pure pixel work,
views in encoding order, v = num_views()) and `fuse(view_features (v, b, h*w, c)) -> ViewFeatures`, so a
caller can encode the views once (e.g. to visual token ids with a frozen tokenizer) and fuse their
features later: `fuse(encode(make_views(x).flatten(0, 1)).unflatten(0, (v, b)))` equals `forward(x, encode)`
for an `encode` that treats rows independently.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from unicode_mllm.addons.compression.base import Compressor
from unicode_mllm.addons.compression.grid_layout import check_grid_hw, merge_blocks, split_blocks
from unicode_mllm.addons.highres.dual_perspective import DualPerspectiveEnhancement, dual_perspective_crops
from unicode_mllm.errors import ConfigError
from unicode_mllm.registry import Registry

EncodeFn = Callable[[Tensor], Tensor]  # (b, 3, H, W) pixels -> (b, h*w, c) features
S2Merge = Literal["token", "channel"]


@dataclass(frozen=True)
class ViewFeatures:
    """tokens: (b, n, c); grids: the raster grid of each consecutive token segment, sum(h*w) == n."""

    tokens: Tensor
    grids: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        total = sum(h * w for h, w in self.grids)
        if self.tokens.ndim != 3 or self.tokens.shape[1] != total:
            raise ValueError(f"ViewFeatures: tokens {tuple(self.tokens.shape)} do not cover grids {self.grids}")


@dataclass(frozen=True)
class CompressedViews:
    """tokens: (b, m, c_out), the compressed segments concatenated; per segment its output grid (or None)."""

    tokens: Tensor
    grids: tuple[tuple[int, int] | None, ...]
    lengths: tuple[int, ...]


def compress_view_features(compressor: Compressor, features: ViewFeatures) -> CompressedViews:
    """Run `compressor` on each grid segment of `features` and concatenate: (b, n, c) -> (b, m, c_out)."""
    outputs, grids, lengths, start = [], [], [], 0
    for h, w in features.grids:
        out = compressor(features.tokens[:, start : start + h * w], (h, w))
        outputs.append(out.tokens)
        grids.append(out.grid_hw)
        lengths.append(out.tokens.shape[1])
        start += h * w
    return CompressedViews(torch.cat(outputs, dim=1), tuple(grids), tuple(lengths))


def resize_images(images: Tensor, size_hw: tuple[int, int], antialias: bool = False) -> Tensor:
    """Bicubic resize of (b, c, H, W) to size_hw in >= fp32 (cast back); the input itself when the size matches."""
    if tuple(images.shape[-2:]) == tuple(size_hw):
        return images
    upcast = images.to(torch.promote_types(images.dtype, torch.float32))
    out = F.interpolate(upcast, size=size_hw, mode="bicubic", align_corners=False, antialias=antialias)
    return out.to(images.dtype)


class ViewGenerator(nn.Module):
    """Base class: holds the encoder's native view_size (H, W) pixels, view_grid (h, w) and feature width c."""

    name: ClassVar[str] = ""

    def __init__(self, view_size: tuple[int, int], view_grid: tuple[int, int], width: int, antialias: bool = False):
        super().__init__()
        try:
            self.view_size = check_grid_hw(tuple(view_size))
            self.view_grid = check_grid_hw(tuple(view_grid))
        except (TypeError, ValueError):
            raise ConfigError(
                f"view generator {self.name!r}: view_size and view_grid must be (h, w) pairs of positive ints; got "
                f"{view_size!r}, {view_grid!r}"
            ) from None
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"view generator {self.name!r}: width must be a positive int, got {width!r}")
        self.width = width
        self.antialias = bool(antialias)

    def output_grids(self) -> tuple[tuple[int, int], ...]:
        """The grids of the returned `ViewFeatures`, in order."""
        raise NotImplementedError

    def out_width(self) -> int:
        """The channel width of the returned tokens."""
        return self.width

    def num_output_tokens(self) -> int:
        return sum(h * w for h, w in self.output_grids())

    def num_views(self) -> int:
        """How many view-size images `encode` sees per input image."""
        raise NotImplementedError

    def _encode(self, encode: EncodeFn, views: Tensor) -> Tensor:
        """Encode (m, 3, H, W) views and check the result is (m, h*w, width)."""
        feats = encode(views)
        h, w = self.view_grid
        expected = (views.shape[0], h * w, self.width)
        if tuple(feats.shape) != expected:
            raise ValueError(
                f"{self.name}: encode returned {tuple(feats.shape)} for views {tuple(views.shape)}; expected "
                f"{expected} (view_grid={self.view_grid}, width={self.width})"
            )
        return feats

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4:
            raise ValueError(f"{self.name}: images must be (b, c, H, W); got shape {tuple(images.shape)}")

    def _check_view_features(self, view_features: Tensor) -> tuple[int, int]:
        """(v, b, h*w, c) features of the views -> (v, b); raises ValueError for another shape."""
        h, w = self.view_grid
        v = self.num_views()
        if view_features.ndim != 4 or view_features.shape[0] != v or view_features.shape[2:] != (h * w, self.width):
            raise ValueError(
                f"{self.name}: view features must be ({v}, b, {h * w}, {self.width}) (views, batch, view_grid "
                f"{self.view_grid}, width); got {tuple(view_features.shape)}"
            )
        return v, view_features.shape[1]

    def make_views(self, images: Tensor) -> Tensor:
        """(b, c, H, W) images -> (v, b, c, vh, vw) views at view_size, in the order `fuse` expects."""
        raise NotImplementedError

    def fuse(self, view_features: Tensor) -> ViewFeatures:
        """(v, b, h*w, c) features of `make_views`' views (same order) -> ViewFeatures."""
        raise NotImplementedError

    def forward(self, images: Tensor, encode: EncodeFn) -> ViewFeatures:
        """(b, c, H, W) images of any size -> ViewFeatures; see the module docstring per generator."""
        raise NotImplementedError


VIEW_GENERATORS: Registry[type[ViewGenerator]] = Registry(
    "view generator", size_args=("view_size", "view_grid", "width")
)


def register_view_generator(name: str) -> Callable[[type[ViewGenerator]], type[ViewGenerator]]:
    """Class decorator: register a `ViewGenerator` subclass under `name` (sets `cls.name`)."""
    return VIEW_GENERATORS.register(name)


def view_generator_option_names(name: str) -> tuple[str, ...]:
    """The keyword options generator `name` accepts besides view_size, view_grid and width."""
    return VIEW_GENERATORS.option_names(name)


def build_view_generator(
    name: str, *, view_size: tuple[int, int], view_grid: tuple[int, int], width: int, **options: Any
) -> ViewGenerator:
    """Build view generator `name` for an encoder with native view_size/view_grid and feature width.

    Raises ConfigError for an unknown name or option (listing the valid ones) and for invalid values.
    """
    return VIEW_GENERATORS.build(name, options, view_size=view_size, view_grid=view_grid, width=width)


@register_view_generator("single")
class SingleView(ViewGenerator):
    """The image resized to view_size, encoded once: (b, c, H, W) -> (b, h*w, width) on view_grid."""

    def __init__(self, view_size: tuple[int, int], view_grid: tuple[int, int], width: int, antialias: bool = False):
        super().__init__(view_size, view_grid, width, antialias)

    def output_grids(self) -> tuple[tuple[int, int], ...]:
        return (self.view_grid,)

    def num_views(self) -> int:
        return 1

    def make_views(self, images: Tensor) -> Tensor:
        self._check_images(images)
        return resize_images(images, self.view_size, self.antialias)[None]  # (1, b, c, vh, vw)

    def fuse(self, view_features: Tensor) -> ViewFeatures:
        self._check_view_features(view_features)
        return ViewFeatures(view_features[0], (self.view_grid,))

    def forward(self, images: Tensor, encode: EncodeFn) -> ViewFeatures:
        self._check_images(images)
        feats = self._encode(encode, resize_images(images, self.view_size, self.antialias))
        return ViewFeatures(feats, (self.view_grid,))


@register_view_generator("s2")
class S2MultiScale(ViewGenerator):
    """S^2 multi-scale views: per scale s, s x s view-size tiles of the image at s*view_size, merged and pooled.

    scales: strictly ascending positive ints (e.g. (1, 2) for 256 + 512 px on a 256 px tokenizer).
    merge: 'token' -> (b, k * s0^2*h*w, c), grids ((s0*h, s0*w),) * k; 'channel' -> (b, s0^2*h*w, k*c).
    """

    def __init__(
        self,
        view_size: tuple[int, int],
        view_grid: tuple[int, int],
        width: int,
        scales: Sequence[int] = (1, 2),
        merge: S2Merge = "token",
        antialias: bool = False,
    ):
        super().__init__(view_size, view_grid, width, antialias)
        scales = tuple(scales)
        if not scales or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales):
            raise ConfigError(f"s2 scales must be positive ints (multiples of view_size), got {scales!r}")
        if any(a >= b for a, b in itertools.pairwise(scales)):
            raise ConfigError(f"s2 scales must be strictly ascending (outputs are pooled to the first), got {scales!r}")
        if merge not in ("token", "channel"):
            raise ConfigError(f"s2 merge {merge!r} is unknown; choose 'token' or 'channel'")
        self.scales = scales
        self.merge = merge

    def _base_grid(self) -> tuple[int, int]:
        return (self.scales[0] * self.view_grid[0], self.scales[0] * self.view_grid[1])

    def output_grids(self) -> tuple[tuple[int, int], ...]:
        return (self._base_grid(),) * (len(self.scales) if self.merge == "token" else 1)

    def out_width(self) -> int:
        return self.width * (len(self.scales) if self.merge == "channel" else 1)

    def num_views(self) -> int:
        return sum(s * s for s in self.scales)

    def _scale_views(self, images: Tensor, s: int) -> Tensor:
        """(b, 3, H, W) -> (s*s, b, 3, vh, vw): the s x s view-size tiles of the image resized to s*view_size."""
        vh, vw = self.view_size
        scaled = resize_images(images, (s * vh, s * vw), self.antialias)  # (b, 3, s*vh, s*vw)
        return split_blocks(scaled, s)  # index (i*s + j, batch), row-major tiles

    def _merge_scale(self, feats: Tensor, s: int) -> Tensor:
        """(s*s, b, h*w, c) tile features -> (b, c, s*h, s*w) merged map."""
        h, w = self.view_grid
        return merge_blocks(rearrange(feats, "v b (h w) c -> v b c h w", h=h, w=w), s)

    def scale_maps(self, images: Tensor, encode: EncodeFn) -> list[Tensor]:
        """Per scale s, the merged feature map of its s x s tiles: [(b, c, s*h, s*w)], before pooling."""
        self._check_images(images)
        maps = []
        for s in self.scales:
            tiles = self._scale_views(images, s)  # (s*s, b, 3, vh, vw)
            feats = self._encode(encode, tiles.flatten(0, 1))  # (s*s*b, h*w, c), index (i*s + j)*b + batch
            maps.append(self._merge_scale(feats.unflatten(0, tiles.shape[:2]), s))
        return maps

    def _pool_and_merge(self, maps: list[Tensor]) -> ViewFeatures:
        base = self._base_grid()
        pooled = []
        for fmap in maps:
            # S^2's F.interpolate(mode='area') is adaptive average pooling, done in (at least) fp32 as the reference.
            if tuple(fmap.shape[-2:]) != base:
                upcast = fmap.to(torch.promote_types(fmap.dtype, torch.float32))
                fmap = F.adaptive_avg_pool2d(upcast, base).to(fmap.dtype)
            pooled.append(fmap)  # (b, c, s0*h, s0*w)
        if self.merge == "channel":
            tokens = rearrange(torch.cat(pooled, dim=1), "b c h w -> b (h w) c")  # (b, s0^2*h*w, k*c)
        else:
            tokens = torch.cat([rearrange(p, "b c h w -> b (h w) c") for p in pooled], dim=1)  # (b, k*s0^2*h*w, c)
        return ViewFeatures(tokens, self.output_grids())

    def make_views(self, images: Tensor) -> Tensor:
        """(b, 3, H, W) -> (sum s^2, b, 3, vh, vw): each scale's tiles in turn, scales ascending."""
        self._check_images(images)
        return torch.cat([self._scale_views(images, s) for s in self.scales], dim=0)

    def fuse(self, view_features: Tensor) -> ViewFeatures:
        self._check_view_features(view_features)
        maps, start = [], 0
        for s in self.scales:
            maps.append(self._merge_scale(view_features[start : start + s * s], s))
            start += s * s
        return self._pool_and_merge(maps)

    def forward(self, images: Tensor, encode: EncodeFn) -> ViewFeatures:
        return self._pool_and_merge(self.scale_maps(images, encode))


@register_view_generator("inf_llava")
class InfLlavaDualPerspective(ViewGenerator):
    """INF-LLaVA: 2*n*n + 1 views (local tiles, strided global sub-images, the base view), DEM fusion, mean.

    (b, c, H, W) -> (b, h*w, width) on view_grid. `enhancement` (the DEM) is trainable; width must be divisible
    by 16 and num_heads.
    """

    def __init__(
        self,
        view_size: tuple[int, int],
        view_grid: tuple[int, int],
        width: int,
        n: int = 3,
        num_heads: int = 8,
        antialias: bool = False,
    ):
        super().__init__(view_size, view_grid, width, antialias)
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ConfigError(f"inf_llava n (tiles per side) must be an int >= 2, got {n!r}")
        self.n = n
        self.enhancement = DualPerspectiveEnhancement(width, num_heads)

    def output_grids(self) -> tuple[tuple[int, int], ...]:
        return (self.view_grid,)

    def num_views(self) -> int:
        return 2 * self.n * self.n + 1

    def make_views(self, images: Tensor) -> Tensor:
        """(b, 3, H, W) -> (2*n*n + 1, b, 3, vh, vw): n*n local tiles, n*n strided sub-images, the base view."""
        self._check_images(images)
        (vh, vw), n = self.view_size, self.n
        large = resize_images(images, (n * vh, n * vw), self.antialias)  # (b, 3, n*vh, n*vw)
        local_views, global_views = dual_perspective_crops(large, n)  # (n*n, b, 3, vh, vw) each
        base_view = resize_images(images, (vh, vw), self.antialias)  # (b, 3, vh, vw)
        return torch.cat([local_views, global_views, base_view[None]], dim=0)

    def fuse(self, view_features: Tensor) -> ViewFeatures:
        self._check_view_features(view_features)
        nn_ = self.n * self.n
        local_feats, global_feats = view_features[:nn_], view_features[nn_ : 2 * nn_]  # (n*n, b, h*w, c) each
        fused = self.enhancement(local_feats, global_feats, self.view_grid)  # (b, h*w, c)
        # The reference averages the DEM map and the base view: mean over a stacked last axis.
        tokens = torch.stack([view_features[2 * nn_], fused], dim=-1).mean(dim=-1)
        return ViewFeatures(tokens, (self.view_grid,))

    def forward(self, images: Tensor, encode: EncodeFn) -> ViewFeatures:
        views = self.make_views(images)  # (2*n*n + 1, b, 3, vh, vw)
        feats = self._encode(encode, views.flatten(0, 1))  # ((2*n*n + 1) * b, h*w, c), view-major
        return self.fuse(feats.unflatten(0, views.shape[:2]))
