"""INF-LLaVA (arXiv 2407.21416): dual-perspective cropping (DCM) and the dual-perspective enhancement module (DEM).

After WeihuangLin/INF-LLaVA@4b2bde6, INF_llava/model/llava_arch.py (`crop_pixels_N`, `extract_pixels_N`,
`combine_crop_features_N`, `combine_stride_features_N`, `MultiHeadedAttention`, `SpatialEmbed`), re-implemented
from reading; sizes are parameters here (the reference hard-codes d = 1024, n = 3 and a 24x24 output).

DCM: an image (b, c, n*H, n*W) gives n*n **local** tiles (contiguous blocks, row-major) and n*n **global**
sub-images (x[:, :, a::n, e::n], plain decimation, each spanning the whole image).

DEM, on the view features (d channels, each view an (h, w) grid):
  L = the local tiles' features tiled back into one (n*h, n*w) map; G = the global features interleaved
  back (G[a::n, e::n] = view a*n + e), so L and G are image-aligned.
  Branch A: split L and G into n*n contiguous blocks; block i: MHA(query = G_i, key = value = L_i);
            tile the results -> G' (local detail injected into the global map).
  Branch B: split L and G into n*n strided subsets; subset i: MHA(query = L_i, key = value = G_i);
            interleave the results -> L' (global context injected into the local map).
  One MHA serves both branches: 4 x Linear(d, d) with bias, `num_heads` heads, softmax(q k^T / sqrt(d/heads)),
  output LayerNorm(out_proj(attn) + query), the residual being the un-projected query.
  fused = LayerNorm(concat[ffn_local(L'), ffn_global(G')] + G' + L'), each ffn Linear(d, d/16) -> GELU ->
  Linear(d/16, d/2); then bilinear (fp32, align_corners False) to the output grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from unicode_mllm.addons.compression.grid_layout import (
    check_grid_hw,
    merge_blocks,
    merge_strided,
    split_blocks,
    split_strided,
)
from unicode_mllm.errors import ConfigError


def dual_perspective_crops(images: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """INF-LLaVA's DCM on (b, c, H, W) pixels (or any map) with H, W divisible by n.

    Returns (local, global), each (n*n, b, c, H/n, W/n):
    local[i*n + j] = images[:, :, i*H/n:(i+1)*H/n, j*W/n:(j+1)*W/n]; global[a*n + e] = images[:, :, a::n, e::n].
    Raises ValueError when a side is not divisible by n (the reference asserts for the local view only).
    """
    return split_blocks(images, n), split_strided(images, n)


class DualPerspectiveAttention(nn.Module):
    """INF-LLaVA's `MultiHeadedAttention`: (b, t, d) queries, (b, s, d) keys/values -> (b, t, d).

    out = LayerNorm(out_proj(softmax(Q K^T / sqrt(d/heads)) V) + query) with Q, K, V = Linear(d, d) with bias.
    """

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        q, k, v = (
            rearrange(t, "b t (n e) -> b n t e", n=self.num_heads)
            for t in (self.query(query), self.key(memory), self.value(memory))
        )
        attended = rearrange(F.scaled_dot_product_attention(q, k, v), "b n t e -> b t (n e)")
        return self.norm(self.out(attended) + query)


def _bottleneck(width: int) -> nn.Sequential:
    """Linear(d, d/16) -> GELU -> Linear(d/16, d/2): INF-LLaVA's `ffn_crop` / `ffn_stride`."""
    return nn.Sequential(nn.Linear(width, width // 16), nn.GELU(), nn.Linear(width // 16, width // 2))


class DualPerspectiveEnhancement(nn.Module):
    """INF-LLaVA's DEM (`SpatialEmbed`) for width d: n*n local + n*n global view features -> one fused map.

    width must be divisible by 16 and by num_heads (reference: d = 1024, 8 heads).
    """

    def __init__(self, width: int, num_heads: int = 8):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 16 or width % 16:
            raise ConfigError(f"INF-LLaVA DEM needs a width divisible by 16 (d/16 and d/2 bottlenecks); got {width}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or width % num_heads:
            raise ConfigError(f"INF-LLaVA DEM: width {width} is not divisible by num_heads {num_heads!r}")
        self.width = width
        self.attention = DualPerspectiveAttention(width, num_heads)
        self.ffn_local = _bottleneck(width)  # the reference's ffn_crop
        self.ffn_global = _bottleneck(width)  # the reference's ffn_stride
        self.fuse_norm = nn.LayerNorm(width)

    def forward(
        self,
        local_feats: Tensor,
        global_feats: Tensor,
        grid_hw: tuple[int, int],
        out_grid: tuple[int, int] | None = None,
    ) -> Tensor:
        """local_feats, global_feats: (n*n, b, h*w, d) view features in DCM order -> (b, oh*ow, d).

        grid_hw: (h, w) of each view; out_grid: (oh, ow), default grid_hw (the reference's 24x24 at 336 px).
        Raises ValueError for mismatched shapes or a view count that is not a square.
        """
        h, w = check_grid_hw(grid_hw)
        out_grid = (h, w) if out_grid is None else check_grid_hw(out_grid)
        if local_feats.ndim != 4 or local_feats.shape != global_feats.shape:
            raise ValueError(
                f"local and global features must both be (n*n, b, h*w, d); got {tuple(local_feats.shape)} and "
                f"{tuple(global_feats.shape)}"
            )
        views, _, tokens, width = local_feats.shape
        n = round(views**0.5)
        if n * n != views or tokens != h * w or width != self.width:
            raise ValueError(
                f"DEM expects (n*n, b, {h * w}, {self.width}) features for grid_hw={(h, w)}; got "
                f"{tuple(local_feats.shape)}"
            )

        def to_maps(feats: Tensor) -> Tensor:  # (n*n, b, h*w, d) -> (n*n, b, d, h, w)
            return rearrange(feats, "v b (h w) d -> v b d h w", h=h, w=w)

        def attend(queries: Tensor, memory: Tensor) -> Tensor:  # (n*n, b, d, h, w) x 2 -> (n*n, b, d, h, w)
            flat = [rearrange(t, "v b d h w -> (v b) (h w) d") for t in (queries, memory)]
            out = self.attention(*flat)  # the n*n blocks share the MHA, batched on the first axis
            return rearrange(out, "(v b) (h w) d -> v b d h w", v=views, h=h, w=w)

        local_map = merge_blocks(to_maps(local_feats), n)  # L: (b, d, n*h, n*w)
        global_map = merge_strided(to_maps(global_feats), n)  # G: (b, d, n*h, n*w)
        # Branch A (contiguous blocks): global queries read local detail -> G'.
        global_enhanced = merge_blocks(attend(split_blocks(global_map, n), split_blocks(local_map, n)), n)
        # Branch B (strided subsets): local queries read global context -> L'.
        local_enhanced = merge_strided(attend(split_strided(local_map, n), split_strided(global_map, n)), n)

        local_enhanced = rearrange(local_enhanced, "b d y x -> b y x d")
        global_enhanced = rearrange(global_enhanced, "b d y x -> b y x d")
        down = torch.cat([self.ffn_local(local_enhanced), self.ffn_global(global_enhanced)], dim=-1)  # (b, nh, nw, d)
        fused = self.fuse_norm(down + global_enhanced + local_enhanced)
        fused = rearrange(fused, "b y x d -> b d y x")
        # The reference interpolates in fp32 and casts back (half precision is upcast, wider types are kept).
        upcast = fused.to(torch.promote_types(fused.dtype, torch.float32))
        out = F.interpolate(upcast, size=out_grid, mode="bilinear", align_corners=False).to(fused.dtype)
        return rearrange(out, "b d y x -> b (y x) d")
