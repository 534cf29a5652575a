"""Token compressors: seed golden fixtures (exact), HF reference modules, and the invariants their docstrings
(`compression/__init__.py`) state.

Fixtures are in tests/fixtures/seed_golden (with their README):
inputs, weights and outputs computed once from the seeds' reference snippets. CPU, fp32, tiny widths.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file

from unicode_mllm.addons.compression import (
    COMPRESSORS,
    CompressorConfig,
    adaptive_pool_tokens,
    build_compressor,
    gather_2x2,
    internvl_pixel_shuffle,
    sincos_2d,
)
from unicode_mllm.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "seed_golden"
# The fixtures README's bound: an independent implementation lands within 2.4e-7; common mistakes are >= 4e-5 off.
ATOL, RTOL = 1e-6, 1e-5

# Every registered compressor at a tiny size (llm_width 16 unless the options say otherwise).
WIDTH = 16
TINY = {
    "identity": {},
    "pool2x": {"mode": "average"},
    "deco_avgpool": {"target_grid": (2, 2)},
    "ldpv2": {"target_grid": (2, 2)},
    "internvl_ps": {},
    "qwen2vl_merger": {},
    "qformer": {"num_queries": 5, "num_layers": 2, "hidden_width": 16, "num_heads": 2},
    "perceiver": {"num_latents": 6, "depth": 2, "num_heads": 2, "head_width": 8},
}


def fixture(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / f"{name}.safetensors")


def build(name: str, **overrides):
    torch.manual_seed(0)
    return build_compressor(name, WIDTH, **{**TINY[name], **overrides}).eval()


def test_every_registered_compressor_is_covered():
    assert sorted(COMPRESSORS) == sorted(TINY)


# ---------------------------------------------------------------- golden fixtures


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("case", ["sq", "rect"])
def test_pixel_shuffle_matches_fixture(version, case):
    d = fixture("pixel_shuffle")
    assert torch.equal(internvl_pixel_shuffle(d[f"x_{case}"], version), d[f"{version}_{case}"])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_internvl_compressor_shuffle_stage_matches_fixture(version):
    """The compressor reads raster tokens on an explicit (8, 6) grid and returns the fixture's layout and grid."""
    d = fixture("pixel_shuffle")
    x = d["x_rect"]  # (2, 8, 6, 16): 8 rows, 6 columns
    model = build_compressor("internvl_ps", 32, ps_version=version, input_width=16)
    tokens = rearrange(x, "b h w c -> b (h w) c")
    expected = d[f"{version}_rect"]  # v2 (2, 4, 3, 64), v1 (2, 3, 4, 64)
    assert model.output_grid(8, 6) == tuple(expected.shape[1:3])
    assert torch.equal(model.shuffle(tokens, (8, 6)), rearrange(expected, "b h w c -> b (h w) c"))
    out, grid = model(tokens, (8, 6))
    assert grid == tuple(expected.shape[1:3]) and out.shape == (2, 12, 32)
    with torch.no_grad():
        manual = model.mlp(model.norm(rearrange(expected, "b h w c -> b (h w) c")))
    assert torch.allclose(out, manual, atol=ATOL, rtol=RTOL)


def test_pixel_shuffle_layout_invariants():
    x = torch.randn(2, 8, 6, 5)
    v2 = internvl_pixel_shuffle(x, "v2")
    gathered = torch.cat([x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]], dim=-1)
    assert torch.equal(v2, gathered)  # v2 == the 2x2 gather (TL, TR, BL, BR)
    assert torch.equal(internvl_pixel_shuffle(x, "v1"), v2.transpose(1, 2))  # v1 == v2 transposed
    recovered = rearrange(v2, "b h w (p q c) -> b (h p) (w q) c", p=2, q=2)
    assert torch.equal(recovered, x)  # lossless
    with pytest.raises(ValueError, match="even"):
        internvl_pixel_shuffle(torch.randn(1, 5, 4, 3), "v2")


def test_internvl_ps_1024_to_256():
    model = build_compressor("internvl_ps", 8, input_width=4)
    out, grid = model(torch.randn(1, 1024, 4), (32, 32))
    assert out.shape == (1, 256, 8) and grid == (16, 16)


def _load_deco(d: dict[str, torch.Tensor]):
    model = build_compressor("deco_avgpool", 48, target_grid=(4, 4), mlp_layers=2, input_width=32).eval()
    # Fixture key map: the reference's `mlp_projector.{0,2}` are our `mlp.{0,2}` (index 1 is the GELU).
    state = {k.replace("state.mlp_projector.", "mlp."): v for k, v in d.items() if k.startswith("state.")}
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("side", [8, 6])
def test_deco_matches_fixture(side):
    d = fixture("deco_avgpool")
    model = _load_deco(d)
    x = d[f"x_{side}x{side}"]
    pooled = adaptive_pool_tokens(x, (side, side), (4, 4))
    assert torch.allclose(pooled, d[f"pooled_{side}x{side}"], atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        out, grid = model(x, (side, side))
    assert grid == (4, 4)
    assert torch.allclose(out, d[f"out_{side}x{side}"], atol=ATOL, rtol=RTOL)


def test_ldpv2_matches_fixture():
    d = fixture("ldpv2")
    model = build_compressor("ldpv2", 48, target_grid=(4, 4), input_width=32).eval()
    # Fixture key map: FeatureIRLayer `mlp.mlp.*` -> `mlp.*`; PosInjectLayer `peg.peg.0.*` -> `peg.*`.
    state = {}
    for key, value in d.items():
        if key.startswith("state.mlp.mlp."):
            state["mlp." + key.removeprefix("state.mlp.mlp.")] = value
        elif key.startswith("state.peg.peg.0."):
            state["peg." + key.removeprefix("state.peg.peg.0.")] = value
    assert len(state) == sum(k.startswith("state.") for k in d)
    model.load_state_dict(state)
    with torch.no_grad():
        after_mlp = model.mlp(d["x"])
        out, grid = model(d["x"], (8, 8))
    assert torch.allclose(after_mlp, d["after_mlp"], atol=ATOL, rtol=RTOL)
    assert torch.allclose(adaptive_pool_tokens(after_mlp, (8, 8), (4, 4)), d["after_dwn"], atol=ATOL, rtol=RTOL)
    assert grid == (4, 4)
    assert torch.allclose(out, d["out"], atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- pooling invariants


def test_ldpv2_zero_peg_is_identity():
    model = build("ldpv2", target_grid=(3, 4))
    with torch.no_grad():
        model.peg.weight.zero_()
        model.peg.bias.zero_()
        x = torch.randn(2, 6 * 8, WIDTH)
        out, _ = model(x, (6, 8))
        expected = adaptive_pool_tokens(model.mlp(x), (6, 8), (3, 4))
    assert torch.equal(out, expected)


def test_ldpv2_576_to_144_and_non_square_grid():
    model = build_compressor("ldpv2", 8, target_grid=(12, 12))
    assert model(torch.randn(1, 576, 8), (24, 24)).tokens.shape == (1, 144, 8)
    model = build_compressor("ldpv2", 8, target_grid=(12, 16))
    out, grid = model(torch.randn(1, 24 * 32, 8), (24, 32))
    assert out.shape == (1, 192, 8) and grid == (12, 16)


def test_adaptive_pool_windows_explicit():
    """Overlapping windows [floor(i*In/Out), ceil((i+1)*In/Out)) on each axis, checked with explicit means."""
    h, w, th, tw = 6, 5, 4, 3
    x = torch.randn(2, h * w, 3, dtype=torch.float64)
    out = adaptive_pool_tokens(x, (h, w), (th, tw))
    grid = x.reshape(2, h, w, 3)
    for i in range(th):
        r0, r1 = (i * h) // th, -(-((i + 1) * h) // th)
        for j in range(tw):
            c0, c1 = (j * w) // tw, -(-((j + 1) * w) // tw)
            assert torch.allclose(out[:, i * tw + j], grid[:, r0:r1, c0:c1].mean(dim=(1, 2)), atol=1e-12)


def test_deco_pool_commutes_with_one_linear_and_keeps_constants():
    model = build("deco_avgpool", target_grid=(3, 2), mlp_layers=1)
    x = torch.randn(2, 6 * 4, WIDTH)
    with torch.no_grad():
        out, grid = model(x, (6, 4))
        linear_first = adaptive_pool_tokens(model.mlp(x), (6, 4), (3, 2))
    assert grid == (3, 2)
    assert torch.allclose(out, linear_first, atol=1e-6)  # one Linear commutes with averaging
    pool_only = build("deco_avgpool", target_grid=(3, 2), mlp_layers=0)
    assert not pool_only.is_trainable
    constant = torch.randn(1, 1, WIDTH).expand(2, 24, WIDTH)
    assert torch.allclose(pool_only(constant, (6, 4)).tokens, constant[:, :6], atol=1e-6)
    with pytest.raises(ConfigError, match="mlp_layers=0"):
        build_compressor("deco_avgpool", WIDTH, target_grid=(2, 2), mlp_layers=0, input_width=8)


def test_deco_paper_sizes_and_explicit_non_square_grid():
    model = build_compressor("deco_avgpool", 8, target_grid=(12, 12), input_width=4)
    assert model(torch.randn(1, 576, 4), (24, 24)).tokens.shape == (1, 144, 8)
    pool_only = build_compressor("deco_avgpool", 4, target_grid=(12, 16), mlp_layers=0)
    x = torch.randn(1, 24 * 32, 4)
    out, grid = pool_only(x, (24, 32))
    expected = rearrange(F.avg_pool2d(rearrange(x, "b (h w) c -> b c h w", h=24), 2), "b c h w -> b (h w) c")
    assert grid == (12, 16) and torch.allclose(out, expected, atol=1e-6)


def test_pooling_target_larger_than_grid_raises():
    with pytest.raises(ValueError, match="larger than the input grid"):
        build("deco_avgpool", target_grid=(4, 4))(torch.randn(1, 12, WIDTH), (3, 4))
    with pytest.raises(ConfigError, match="needs target_grid"):
        build_compressor("ldpv2", WIDTH)


def test_pool2x_bilinear_equals_average_on_even_grids():
    x = torch.randn(2, 8 * 6, WIDTH)
    bilinear, grid_b = build("pool2x", mode="bilinear")(x, (8, 6))
    average, grid_a = build("pool2x", mode="average")(x, (8, 6))
    assert grid_b == grid_a == (4, 3)
    assert torch.allclose(bilinear, average, atol=1e-6)


def test_pool2x_onevision_counts_on_27x27():
    x = torch.randn(1, 729, WIDTH)
    assert build("pool2x", mode="bilinear")(x, (27, 27)).tokens.shape[1] == 196
    for mode in ("average", "max"):
        assert build("pool2x", mode=mode, odd_grid="crop")(x, (27, 27)).tokens.shape[1] == 169
        assert build("pool2x", mode=mode, odd_grid="pad")(x, (27, 27)).tokens.shape[1] == 196
        with pytest.raises(ValueError, match="divisible by 2"):
            build("pool2x", mode=mode)(x, (27, 27))


def test_pool2x_pad_is_the_mean_of_existing_cells():
    """odd_grid='pad' repeats the last row/column, which for 2x2 windows averages only the real cells."""
    h, w = 5, 3
    x = torch.randn(1, h * w, WIDTH, dtype=torch.float64)
    model = build_compressor("pool2x", WIDTH, mode="average", odd_grid="pad")
    out, grid = model(x, (h, w))
    assert grid == (3, 2)
    cells = x.reshape(h, w, WIDTH)
    for i in range(3):
        for j in range(2):
            window = cells[2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
            assert torch.allclose(out[0, i * 2 + j], window.mean(dim=(0, 1)), atol=1e-12)
    crop, crop_grid = build_compressor("pool2x", WIDTH, mode="average", odd_grid="crop")(x, (h, w))
    assert crop_grid == (2, 1) and torch.allclose(crop[0, 0], cells[:2, :2].mean(dim=(0, 1)), atol=1e-12)


def test_pool2x_stride_option():
    x = torch.randn(2, 6 * 9, WIDTH)
    out, grid = build("pool2x", mode="average", stride=3)(x, (6, 9))
    expected = F.avg_pool2d(rearrange(x, "b (h w) c -> b c h w", h=6), 3)
    assert grid == (2, 3) and torch.allclose(out, rearrange(expected, "b c h w -> b (h w) c"), atol=1e-6)
    assert build("pool2x", mode="bilinear", stride=3).num_output_tokens(7, 8) == 3 * 3


def test_pool2x_constant_in_constant_out():
    constant = torch.randn(1, 1, WIDTH).expand(2, 35, WIDTH)
    for mode in ("average", "max", "bilinear"):
        out, grid = build("pool2x", mode=mode, odd_grid="pad")(constant, (5, 7))
        assert grid == (3, 4)
        assert torch.allclose(out, constant[:, :12], atol=1e-6)


# ---------------------------------------------------------------- 2x2 concat merges


def test_gather_2x2_takes_true_spatial_neighbours():
    """Each merged token holds the 4 raster indices of its 2x2 window, not 4 consecutive raster tokens."""
    h, w = 4, 6
    ids = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w, 1)
    merged = gather_2x2(ids)  # (1, 2, 3, 4)
    for i in range(h // 2):
        for j in range(w // 2):
            p = (2 * i) * w + 2 * j
            assert merged[0, i, j].tolist() == [p, p + 1, p + w, p + w + 1]
    raster_strips = ids.reshape(1, -1, 4)  # what reshape(-1, 4c) on raster tokens would join
    assert not torch.equal(merged.reshape(1, -1, 4), raster_strips)


def test_qwen2_merger_gather_equals_internvl_v2_layout():
    model = build("qwen2vl_merger")
    x = torch.randn(2, 6 * 4, WIDTH)
    with torch.no_grad():
        normed = model.norm(x)
        expected = rearrange(
            internvl_pixel_shuffle(rearrange(normed, "b (h w) c -> b h w c", h=6), "v2"), "b h w c -> b (h w) c"
        )
        assert torch.equal(model.gather(x, (6, 4)), expected)


@pytest.mark.parametrize("grid_hw", [(4, 4), (4, 6), (8, 2)])
def test_qwen2_merger_matches_hf_patch_merger_on_block_major_input(grid_hw):
    """transformers' own PatchMerger reads block-major patches (h/2, w/2, 2, 2); ours reads the raster grid."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

    h, w = grid_hw
    torch.manual_seed(0)
    hf = PatchMerger(dim=48, context_dim=16).eval()
    ours = build_compressor("qwen2vl_merger", 48, input_width=16).eval()
    # Key map: HF `ln_q` is our `norm`; `mlp.{0,2}` match.
    ours.load_state_dict({k.replace("ln_q.", "norm."): v for k, v in hf.state_dict().items()})
    x = torch.randn(1, h * w, 16)
    block_major = rearrange(x, "b (h p w q) c -> (b h w p q) c", h=h // 2, p=2, w=w // 2, q=2)
    with torch.no_grad():
        reference = hf(block_major)  # (h/2 * w/2, 48), block-major == raster over the merged grid
        out, grid = ours(x, grid_hw)
        raster_misuse = hf(x.reshape(-1, 16))  # the raster reshape joins 1x4 strips
    assert grid == (h // 2, w // 2)
    assert torch.allclose(out[0], reference, atol=1e-6)
    # With w = 2 four consecutive raster tokens are a 2x2 window, so only wider grids tell the orders apart.
    assert torch.allclose(out[0], raster_misuse, atol=1e-6) == (w == 2)


@pytest.mark.parametrize("name", ["internvl_ps", "qwen2vl_merger"])
def test_concat_merges_odd_grid_policies(name):
    x = torch.randn(1, 5 * 7, WIDTH)
    with pytest.raises(ValueError, match=r"divisible by 2; got grid_hw=\(5, 7\)"):
        build(name)(x, (5, 7))
    with pytest.raises(ValueError, match="divisible by 2"):
        build(name).num_output_tokens(5, 7)
    padded = build(name, odd_grid="pad")
    cropped = build(name, odd_grid="crop")
    assert padded(x, (5, 7)).tokens.shape[1] == padded.num_output_tokens(5, 7) == 3 * 4
    assert cropped(x, (5, 7)).tokens.shape[1] == cropped.num_output_tokens(5, 7) == 2 * 3
    # 'crop' equals running on the top-left even sub-grid; 'pad' equals running on the edge-replicated grid.
    grid = x.reshape(1, 5, 7, WIDTH)
    with torch.no_grad():
        top_left = build(name)(grid[:, :4, :6].reshape(1, 24, WIDTH), (4, 6)).tokens
        replicated = torch.cat([grid, grid[:, -1:]], dim=1)
        replicated = torch.cat([replicated, replicated[:, :, -1:]], dim=2)
        full = build(name)(replicated.reshape(1, 48, WIDTH), (6, 8)).tokens
        assert torch.equal(cropped(x, (5, 7)).tokens, top_left)
        assert torch.equal(padded(x, (5, 7)).tokens, full)


# ---------------------------------------------------------------- resamplers


def _copy_hf_qformer_into_ours(hf, ours) -> None:
    """Explicit key map from transformers' Blip2QFormerModel to our `qformer` compressor."""
    renames = [
        ("layernorm.", "query_norm."),
        ("attention.attention.", "self_attention."),
        ("attention.output.dense.", "self_attention.dense."),
        ("attention.output.LayerNorm.", "self_attention.norm."),
        ("crossattention.attention.", "cross_attention."),
        ("crossattention.output.dense.", "cross_attention.dense."),
        ("crossattention.output.LayerNorm.", "cross_attention.norm."),
        ("intermediate_query.dense.", "ffn_in."),
        ("output_query.dense.", "ffn_out."),
        ("output_query.LayerNorm.", "ffn_norm."),
    ]
    state = {}
    for key, value in hf.state_dict().items():
        prefix, rest = "", key
        if key.startswith("encoder.layer."):
            index, rest = key.removeprefix("encoder.layer.").split(".", 1)
            prefix = f"layers.{index}."
        old, repl = next(((o, r) for o, r in renames if rest.startswith(o)), ("", ""))
        state[prefix + repl + rest.removeprefix(old)] = value
    missing = ours.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    assert sorted(missing.missing_keys) == [
        "memory.norm.bias",
        "memory.norm.weight",
        "proj.bias",
        "proj.weight",
        "queries",
    ]


def test_qformer_matches_hf_blip2_qformer():
    from transformers import Blip2QFormerConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

    config = Blip2QFormerConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        cross_attention_frequency=2,
        encoder_hidden_size=48,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = Blip2QFormerModel(config).eval()
    ours = build_compressor(
        "qformer", 24, num_queries=8, num_layers=2, hidden_width=64, num_heads=4, cross_attention_freq=2, input_width=48
    ).eval()
    _copy_hf_qformer_into_ours(hf, ours)
    assert ours.layers[0].cross_attention is not None and ours.layers[1].cross_attention is None
    x = torch.randn(2, 5 * 10, 48)
    with torch.no_grad():
        memory = ours.memory(x, (5, 10))
        hidden = hf(query_embeds=ours.queries.expand(2, -1, -1), encoder_hidden_states=memory).last_hidden_state
        out, grid = ours(x, (5, 10))
    assert grid is None
    assert torch.allclose(out, ours.proj(hidden), atol=1e-6)


def naive_perceiver(model, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Flamingo's resampler written out (arXiv 2204.14198 App. A): per-head softmax, keys/values = [media; latents]."""
    media = model.memory(x, grid_hw)
    latents = model.latents.expand(x.shape[0], -1, -1)
    for attention, feed_forward in model.layers:
        m, lat = attention.norm_media(media), attention.norm_latents(latents)
        q, kv = attention.to_q(lat), torch.cat([m, lat], dim=1)
        inner = q.shape[-1]
        k, v = attention.to_kv(kv)[..., :inner], attention.to_kv(kv)[..., inner:]
        head_width = inner // attention.num_heads
        heads = []
        for head in range(attention.num_heads):
            cols = slice(head * head_width, (head + 1) * head_width)
            scores = (q[..., cols] * head_width**-0.5) @ k[..., cols].transpose(1, 2)
            heads.append(torch.softmax(scores - scores.amax(dim=-1, keepdim=True), dim=-1) @ v[..., cols])
        latents = attention.to_out(torch.cat(heads, dim=-1)) + latents
        latents = feed_forward(latents) + latents
    return model.proj(model.norm(latents))


def test_perceiver_matches_the_written_out_resampler():
    model = build("perceiver").double()
    x = torch.randn(2, 4 * 6, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        out, grid = model(x, (4, 6))
        assert grid is None
        assert torch.allclose(out, naive_perceiver(model, x, (4, 6)), atol=1e-10)


@pytest.mark.parametrize("name", ["qformer", "perceiver"])
def test_resamplers_have_fixed_length(name):
    model = build(name)
    expected = TINY[name].get("num_queries", TINY[name].get("num_latents"))
    for h, w in [(7, 7), (24, 24), (25, 40)]:
        out, grid = model(torch.randn(1, h * w, WIDTH), (h, w))
        assert out.shape == (1, expected, WIDTH) and grid is None
        assert model.num_output_tokens(h, w) == expected


@pytest.mark.parametrize("name", ["qformer", "perceiver"])
def test_resamplers_need_the_position_table(name):
    """Cross-attention alone cannot see layout; the 2-D sin-cos table makes the output depend on it."""
    x = torch.randn(2, 6 * 4, WIDTH)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    blind = build(name, pos_emb="none")
    with torch.no_grad():
        assert torch.allclose(blind(x, (6, 4)).tokens, blind(x[:, perm], (6, 4)).tokens, atol=1e-5)
        aware = build(name)
        assert not torch.allclose(aware(x, (6, 4)).tokens, aware(x[:, perm], (6, 4)).tokens, atol=1e-3)


def test_sincos_table():
    table = sincos_2d((3, 5), 8)
    assert table.shape == (15, 8) and table.dtype == torch.float32
    assert torch.unique(table, dim=0).shape[0] == 15  # one distinct code per position
    assert torch.equal(table[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))
    assert torch.equal(table[7, :4], table[5, :4]) and torch.equal(table[7, 4:], table[2, 4:])  # rows | cols
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d((2, 2), 6)
    with pytest.raises(ConfigError, match="divisible by 4"):
        build_compressor("perceiver", 6)


# ---------------------------------------------------------------- every compressor


GRIDS = [(4, 4), (6, 8), (2, 10), (8, 6)]


def expected_count(name: str, h: int, w: int) -> int:
    formulas = {
        "identity": h * w,
        "pool2x": (h // 2) * (w // 2),
        "deco_avgpool": 4,
        "ldpv2": 4,
        "internvl_ps": (h // 2) * (w // 2),
        "qwen2vl_merger": (h // 2) * (w // 2),
        "qformer": 5,
        "perceiver": 6,
    }
    return formulas[name]


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("grid_hw", GRIDS)
def test_token_counts(name, grid_hw):
    h, w = grid_hw
    model = build(name)
    out, grid = model(torch.randn(2, h * w, WIDTH), grid_hw)
    n = expected_count(name, h, w)
    assert model.num_output_tokens(h, w) == n
    assert out.shape == (2, n, WIDTH)
    if grid is not None:
        assert grid[0] * grid[1] == n and grid == model.output_grid(h, w)


@pytest.mark.parametrize("name", sorted(TINY))
def test_batch_matches_per_sample(name):
    model = build(name)
    x = torch.randn(3, 6 * 8, WIDTH)
    with torch.no_grad():
        batched = model(x, (6, 8)).tokens
        single = torch.cat([model(x[i : i + 1], (6, 8)).tokens for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TINY))
def test_gradients_flow(name):
    model = build(name).train()
    x = torch.randn(2, 4 * 6, WIDTH, requires_grad=True)
    out, _ = model(x, (4, 6))
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    params = dict(model.named_parameters())
    assert model.is_trainable == bool(params) == (name not in ("identity", "pool2x"))
    for key, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, key


@pytest.mark.parametrize("name", sorted(TINY))
def test_shape_errors(name):
    model = build(name)
    with pytest.raises(ValueError, match=r"h\*w=24"):
        model(torch.randn(1, 25, WIDTH), (4, 6))
    with pytest.raises(ValueError, match="width"):
        model(torch.randn(1, 24, WIDTH + 1), (4, 6))


def test_registry_errors_name_the_choices():
    with pytest.raises(ConfigError, match="unknown; choose one of"):
        build_compressor("qformerr", WIDTH)
    with pytest.raises(ConfigError, match=r"no option\(s\) \['stride'\]; its options are"):
        build_compressor("qwen2vl_merger", WIDTH, stride=2)
    with pytest.raises(ConfigError, match="mode 'avg' is unknown"):
        build_compressor("pool2x", WIDTH, mode="avg")


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("name", sorted(TINY))
def test_config_json_round_trip_rebuilds_the_same_compressor(name):
    cfg = CompressorConfig(name=name, options=TINY[name])
    restored = CompressorConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    torch.manual_seed(0)
    original = cfg.build(WIDTH).eval()
    rebuilt = restored.build(WIDTH).eval()
    rebuilt.load_state_dict(original.state_dict())
    x = torch.randn(2, 4 * 6, WIDTH)
    with torch.no_grad():
        assert torch.equal(original(x, (4, 6)).tokens, rebuilt(x, (4, 6)).tokens)


def test_config_defaults_and_errors():
    cfg = CompressorConfig()
    assert cfg.name == "identity" and cfg.to_dict() == {"name": "identity", "options": {}}
    assert CompressorConfig(name="deco_avgpool", options={"target_grid": [3, 3]}).options["target_grid"] == (3, 3)
    with pytest.raises(ConfigError, match="unknown key"):
        CompressorConfig.from_dict({"name": "identity", "kwargs": {}})
    with pytest.raises(ConfigError, match=r"no option\(s\) \['depth'\]"):
        CompressorConfig.from_dict({"name": "qformer", "options": {"depth": 2}})
    with pytest.raises(ConfigError, match="is unknown"):
        CompressorConfig(name="nope").validate()
