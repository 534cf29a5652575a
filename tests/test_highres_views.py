"""High-resolution view generators (single, S^2, INF-LLaVA) and the INF-LLaVA DEM fusion.

Golden: the `inf_llava_crops` seed fixture (exact). The rest is checked against short loop-based
re-computations written from the papers' descriptions (S^2 §3 / s2wrapper's chessboard + area pooling;
INF-LLaVA §3.2 / DEM), plus the grid invariants of `compression/views.py`. The encoder is a fixed random
stride-4 patchifier, so every view size and grid is known exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from torch import Tensor, nn

from unicode_mllm.addons.compression import CompressorConfig, merge_blocks, merge_strided, split_blocks, split_strided
from unicode_mllm.addons.highres import (
    DualPerspectiveEnhancement,
    InfLlavaDualPerspective,
    S2MultiScale,
    ViewGeneratorConfig,
    build_view_generator,
    compress_view_features,
    dual_perspective_crops,
)
from unicode_mllm.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "seed_golden"
VIEW_SIZE = (16, 16)
VIEW_GRID = (4, 4)
WIDTH = 32
PATCH = 4


class PatchEncoder(nn.Module):
    """A deterministic stand-in encoder: (b, 3, 16, 16) -> (b, 16, 32); records the batch size of each call."""

    def __init__(self, width: int = WIDTH, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, width, PATCH, stride=PATCH)
        self.calls: list[int] = []

    def forward(self, images: Tensor) -> Tensor:
        self.calls.append(images.shape[0])
        return rearrange(self.conv(images), "b c h w -> b (h w) c")


def area_pool(fmap: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """Explicit window means, windows [floor(i*In/Out), ceil((i+1)*In/Out)): (b, c, H, W) -> (b, c, oh, ow)."""
    _, _, H, W = fmap.shape
    oh, ow = out_hw
    out = torch.empty(*fmap.shape[:2], oh, ow, dtype=fmap.dtype)
    for i in range(oh):
        r0, r1 = i * H // oh, math.ceil((i + 1) * H / oh)
        for j in range(ow):
            c0, c1 = j * W // ow, math.ceil((j + 1) * W / ow)
            out[:, :, i, j] = fmap[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


# ---------------------------------------------------------------- INF-LLaVA cropping


def test_inf_llava_crops_match_fixture_and_reassemble():
    d = load_file(FIXTURES / "inf_llava_crops.safetensors")
    local, global_ = dual_perspective_crops(d["image"], 3)  # (9, 1, 3, 4, 4) each
    assert torch.equal(local, d["local_crops"])
    assert torch.equal(global_, d["global_strided"])
    assert torch.equal(merge_blocks(local, 3), d["image"])
    assert torch.equal(merge_strided(global_, 3), d["image"])


@pytest.mark.parametrize("n", [2, 3])
def test_crops_reassemble_non_square_maps(n):
    x = torch.randn(2, 5, 6 * n, 4 * n)
    local, global_ = dual_perspective_crops(x, n)
    assert local.shape == global_.shape == (n * n, 2, 5, 6, 4)
    assert torch.equal(merge_blocks(local, n), x) and torch.equal(merge_strided(global_, n), x)
    assert torch.equal(local[n + 1], x[:, :, 6:12, 4:8])  # block (1, 1)
    assert torch.equal(global_[1], x[:, :, 0::n, 1::n])  # row offset 0, column offset 1
    assert torch.equal(split_blocks(x, n), local) and torch.equal(split_strided(x, n), global_)


def test_crops_reject_non_divisible_sides():
    with pytest.raises(ValueError, match="cannot split a 10x12 map into 3x3 parts"):
        dual_perspective_crops(torch.randn(1, 3, 10, 12), 3)


# ---------------------------------------------------------------- S^2


def naive_s2(images: Tensor, encode, scales: tuple[int, ...], merge: str) -> Tensor:
    """S^2 written out: per scale resize, encode each tile, paste its grid, area-pool to the first scale."""
    (vh, vw), (h, w), b = VIEW_SIZE, VIEW_GRID, images.shape[0]
    maps = []
    for s in scales:
        size = (s * vh, s * vw)
        img = images if images.shape[-2:] == size else F.interpolate(images, size=size, mode="bicubic")
        big = torch.zeros(b, WIDTH, s * h, s * w)
        for i in range(s):
            for j in range(s):
                feats = encode(img[:, :, i * vh : (i + 1) * vh, j * vw : (j + 1) * vw])  # (b, h*w, c)
                big[:, :, i * h : (i + 1) * h, j * w : (j + 1) * w] = rearrange(feats, "b (h w) c -> b c h w", h=h)
        maps.append(big)
    base = (scales[0] * h, scales[0] * w)
    pooled = [area_pool(m, base) for m in maps]
    if merge == "channel":
        return rearrange(torch.cat(pooled, dim=1), "b c h w -> b (h w) c")
    return torch.cat([rearrange(p, "b c h w -> b (h w) c") for p in pooled], dim=1)


@pytest.mark.parametrize("merge", ["token", "channel"])
def test_s2_single_base_scale_is_the_encoder(merge):
    encoder = PatchEncoder()
    images = torch.randn(2, 3, *VIEW_SIZE)
    s2 = build_view_generator("s2", view_size=VIEW_SIZE, view_grid=VIEW_GRID, width=WIDTH, scales=(1,), merge=merge)
    with torch.no_grad():
        out = s2(images, encoder)
        assert torch.equal(out.tokens, encoder(images))
    assert out.grids == (VIEW_GRID,)


@pytest.mark.parametrize("merge", ["token", "channel"])
@pytest.mark.parametrize("scales", [(1, 2, 3), (2, 3)])
def test_s2_matches_the_written_out_algorithm(merge, scales):
    encoder = PatchEncoder()
    images = torch.randn(2, 3, 20, 28)  # any input size: every scale is resized from it
    s2 = S2MultiScale(VIEW_SIZE, VIEW_GRID, WIDTH, scales=scales, merge=merge)
    with torch.no_grad():
        out = s2(images, encoder)
        calls = list(encoder.calls)
        reference = naive_s2(images, encoder, scales, merge)
    assert torch.allclose(out.tokens, reference, atol=1e-5)
    assert out.tokens.shape == (2, s2.num_output_tokens(), s2.out_width())
    assert out.grids == s2.output_grids()
    base = (scales[0] * 4, scales[0] * 4)
    assert out.grids == ((base,) * len(scales) if merge == "token" else (base,))
    assert calls == [s * s * 2 for s in scales]  # each scale's tiles in one batched call


def test_s2_pooling_is_area_interpolation_and_modes_hold_the_same_blocks():
    """Channel block k == token segment k == scale k's merged map, area-interpolated as S^2 does."""
    encoder = PatchEncoder()
    images = torch.randn(1, 3, 32, 32)
    token = S2MultiScale(VIEW_SIZE, VIEW_GRID, WIDTH, scales=(1, 2, 3), merge="token")
    channel = S2MultiScale(VIEW_SIZE, VIEW_GRID, WIDTH, scales=(1, 2, 3), merge="channel")
    with torch.no_grad():
        maps = token.scale_maps(images, encoder)
        tokens = token(images, encoder).tokens  # (1, 3*16, 32)
        channels = channel(images, encoder).tokens  # (1, 16, 96)
    assert [tuple(m.shape[-2:]) for m in maps] == [(4, 4), (8, 8), (12, 12)]
    for k, fmap in enumerate(maps):
        area = rearrange(F.interpolate(fmap, size=(4, 4), mode="area"), "b c h w -> b (h w) c")
        assert torch.equal(tokens[:, 16 * k : 16 * (k + 1)], area)
        assert torch.equal(channels[..., WIDTH * k : WIDTH * (k + 1)], area)


def test_s2_config_errors():
    with pytest.raises(ConfigError, match="strictly ascending"):
        S2MultiScale(VIEW_SIZE, VIEW_GRID, WIDTH, scales=(2, 1))
    with pytest.raises(ConfigError, match="positive ints"):
        S2MultiScale(VIEW_SIZE, VIEW_GRID, WIDTH, scales=(1, 1.5))
    with pytest.raises(ValueError, match=r"encode returned \(2, 16, 8\)"):
        S2MultiScale(VIEW_SIZE, VIEW_GRID, WIDTH, scales=(1,))(torch.randn(2, 3, 16, 16), PatchEncoder(width=8))


def test_single_view_resizes_then_encodes():
    encoder = PatchEncoder()
    single = build_view_generator("single", view_size=VIEW_SIZE, view_grid=VIEW_GRID, width=WIDTH)
    images = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        out = single(images, encoder)
        expected = encoder(F.interpolate(images, size=VIEW_SIZE, mode="bicubic", align_corners=False))
        assert torch.equal(out.tokens, expected) and out.grids == (VIEW_GRID,)
        native = torch.randn(2, 3, *VIEW_SIZE)
        assert torch.equal(single(native, encoder).tokens, encoder(native))  # no resampling at the native size


def test_antialias_option_reaches_the_resize():
    encoder = PatchEncoder()
    images = torch.randn(1, 3, 64, 64)
    plain = build_view_generator("single", view_size=VIEW_SIZE, view_grid=VIEW_GRID, width=WIDTH)
    smooth = build_view_generator("single", view_size=VIEW_SIZE, view_grid=VIEW_GRID, width=WIDTH, antialias=True)
    with torch.no_grad():
        expected = encoder(F.interpolate(images, size=VIEW_SIZE, mode="bicubic", antialias=True))
        assert torch.equal(smooth(images, encoder).tokens, expected)
        assert not torch.allclose(plain(images, encoder).tokens, expected, atol=1e-3)


# ---------------------------------------------------------------- INF-LLaVA DEM


def naive_dem(dem: DualPerspectiveEnhancement, local_feats: Tensor, global_feats: Tensor, grid_hw, swap=False):
    """The DEM with explicit pasting, per-block loops and per-head softmax attention (INF-LLaVA §3.2)."""
    views, b, _, d = local_feats.shape
    n, (h, w) = math.isqrt(views), grid_hw
    L = torch.zeros(b, n * h, n * w, d, dtype=local_feats.dtype)
    G = torch.zeros_like(L)
    for i in range(n):
        for j in range(n):
            L[:, i * h : (i + 1) * h, j * w : (j + 1) * w] = local_feats[i * n + j].reshape(b, h, w, d)
            G[:, i::n, j::n] = global_feats[i * n + j].reshape(b, h, w, d)

    def mha(query: Tensor, memory: Tensor) -> Tensor:  # (b, hq, wq, d), (b, hk, wk, d) -> (b, hq, wq, d)
        att, heads = dem.attention, dem.attention.num_heads
        q_in, kv = query.reshape(b, -1, d), memory.reshape(b, -1, d)
        Q, K, V = att.query(q_in), att.key(kv), att.value(kv)
        dk = d // heads
        outs = []
        for head in range(heads):
            cols = slice(head * dk, (head + 1) * dk)
            scores = Q[..., cols] @ K[..., cols].transpose(1, 2) / math.sqrt(dk)
            outs.append(torch.softmax(scores, dim=-1) @ V[..., cols])
        return att.norm(att.out(torch.cat(outs, dim=-1)) + q_in).reshape(query.shape)

    a_query, a_memory = (L, G) if swap else (G, L)
    b_query, b_memory = (G, L) if swap else (L, G)
    G2, L2 = torch.zeros_like(G), torch.zeros_like(L)
    for i in range(n):  # branch A: contiguous blocks
        for j in range(n):
            rows, cols = slice(i * h, (i + 1) * h), slice(j * w, (j + 1) * w)
            G2[:, rows, cols] = mha(a_query[:, rows, cols], a_memory[:, rows, cols])
    for a in range(n):  # branch B: strided subsets
        for e in range(n):
            L2[:, a::n, e::n] = mha(b_query[:, a::n, e::n], b_memory[:, a::n, e::n])
    fused = dem.fuse_norm(torch.cat([dem.ffn_local(L2), dem.ffn_global(G2)], dim=-1) + G2 + L2)
    out = F.interpolate(fused.permute(0, 3, 1, 2), size=grid_hw, mode="bilinear", align_corners=False)
    return rearrange(out, "b d h w -> b (h w) d")


@pytest.mark.parametrize(("n", "grid_hw"), [(3, (2, 3)), (2, (4, 4))])
def test_dem_matches_the_written_out_module(n, grid_hw):
    torch.manual_seed(0)
    dem = DualPerspectiveEnhancement(WIDTH, num_heads=4).double().eval()
    h, w = grid_hw
    local_feats = torch.randn(n * n, 2, h * w, WIDTH, dtype=torch.float64)
    global_feats = torch.randn(n * n, 2, h * w, WIDTH, dtype=torch.float64)
    inputs = (local_feats.clone(), global_feats.clone())
    with torch.no_grad():
        out = dem(local_feats, global_feats, grid_hw)
        reference = naive_dem(dem, local_feats, global_feats, grid_hw)
        swapped = naive_dem(dem, local_feats, global_feats, grid_hw, swap=True)
    assert out.shape == (2, h * w, WIDTH)
    assert torch.allclose(out, reference, atol=1e-10)
    assert not torch.allclose(out, swapped, atol=1e-3)  # guard: the branch roles matter
    assert torch.equal(local_feats, inputs[0]) and torch.equal(global_feats, inputs[1])  # inputs untouched


def test_dem_output_grid_and_errors():
    dem = DualPerspectiveEnhancement(WIDTH, num_heads=4)
    feats = torch.randn(9, 1, 16, WIDTH)
    assert dem(feats, feats, (4, 4), out_grid=(2, 6)).shape == (1, 12, WIDTH)
    with pytest.raises(ValueError, match="expects"):
        dem(torch.randn(8, 1, 16, WIDTH), torch.randn(8, 1, 16, WIDTH), (4, 4))
    with pytest.raises(ConfigError, match="divisible by 16"):
        DualPerspectiveEnhancement(40)
    with pytest.raises(ConfigError, match="num_heads"):
        DualPerspectiveEnhancement(WIDTH, num_heads=3)


def test_inf_llava_generator_end_to_end():
    encoder = PatchEncoder()
    gen = InfLlavaDualPerspective(VIEW_SIZE, VIEW_GRID, WIDTH, n=3, num_heads=4).eval()
    images = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        out = gen(images, encoder)
        assert encoder.calls == [19 * 2]  # 9 local + 9 global + 1 base view per image, one batched call
        assert gen.num_views() == 19
        large = F.interpolate(images, size=(48, 48), mode="bicubic", align_corners=False)
        base = encoder(F.interpolate(images, size=VIEW_SIZE, mode="bicubic", align_corners=False))
        local_feats = torch.stack(
            [encoder(large[:, :, 16 * i : 16 * i + 16, 16 * j : 16 * j + 16]) for i in range(3) for j in range(3)]
        )
        global_feats = torch.stack([encoder(large[:, :, a::3, e::3]) for a in range(3) for e in range(3)])
        fused = gen.enhancement(local_feats, global_feats, VIEW_GRID)
    assert out.grids == (VIEW_GRID,) and out.tokens.shape == (2, 16, WIDTH)
    assert torch.allclose(out.tokens, (base + fused) / 2, atol=1e-6)


@pytest.mark.parametrize("name", ["single", "s2", "inf_llava"])
def test_view_generators_batch_matches_per_sample(name):
    options = {"s2": {"scales": (1, 2)}, "inf_llava": {"n": 2, "num_heads": 4}}.get(name, {})
    torch.manual_seed(0)
    gen = build_view_generator(name, view_size=VIEW_SIZE, view_grid=VIEW_GRID, width=WIDTH, **options).eval()
    encoder = PatchEncoder()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        batched = gen(images, encoder).tokens
        single = torch.cat([gen(images[i : i + 1], encoder).tokens for i in range(3)])
    assert batched.shape == (3, gen.num_output_tokens(), gen.out_width())
    assert torch.allclose(batched, single, atol=1e-5)


def test_inf_llava_gradients_reach_every_dem_parameter_and_the_encoder():
    encoder = PatchEncoder()
    gen = InfLlavaDualPerspective(VIEW_SIZE, VIEW_GRID, WIDTH, n=2, num_heads=4)
    out = gen(torch.randn(2, 3, 32, 32), encoder).tokens
    (out * torch.randn_like(out)).sum().backward()
    for key, p in [*gen.named_parameters(), *encoder.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, key


# ---------------------------------------------------------------- configs and compressing views


def test_view_generator_config_round_trip():
    cfg = ViewGeneratorConfig(name="s2", options={"scales": [1, 2], "merge": "channel"})
    restored = ViewGeneratorConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg and restored.options["scales"] == (1, 2)
    gen = restored.build(view_size=VIEW_SIZE, view_grid=VIEW_GRID, width=WIDTH)
    assert isinstance(gen, S2MultiScale) and gen.out_width() == 2 * WIDTH
    with pytest.raises(ConfigError, match=r"no option\(s\) \['n'\]"):
        ViewGeneratorConfig(name="s2", options={"n": 3}).validate()
    with pytest.raises(ConfigError, match="unknown; choose one of"):
        ViewGeneratorConfig.from_dict({"name": "anyres"})


def test_compress_view_features_runs_per_grid():
    """S^2 token mode gives one grid per scale; a 2x2 compressor runs on each and the results are concatenated."""
    encoder = PatchEncoder()
    s2 = S2MultiScale(VIEW_SIZE, VIEW_GRID, WIDTH, scales=(1, 2, 3))
    pool = CompressorConfig(name="pool2x", options={"mode": "average"}).build(WIDTH)
    with torch.no_grad():
        feats = s2(torch.randn(2, 3, 48, 48), encoder)
        compressed = compress_view_features(pool, feats)
    assert compressed.grids == ((2, 2),) * 3 and compressed.lengths == (4, 4, 4)
    assert compressed.tokens.shape == (2, 12, WIDTH)
    for k in range(3):
        segment = feats.tokens[:, 16 * k : 16 * (k + 1)]
        assert torch.equal(compressed.tokens[:, 4 * k : 4 * (k + 1)], pool(segment, VIEW_GRID).tokens)
