"""The three code stacks (rq, vq, hq): shapes, round trips, hq layout, gradient scale. 4x4 grids, CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from unicode_mllm.errors import ConfigError, UserError
from unicode_mllm.visual_tokenizer import (
    STACKS,
    HierarchicalStack,
    QuantizerSettings,
    QuantizerStack,
    build_stack,
)

Z_CHANNELS, LLM_WIDTH, NUM_CODES = 8, 16, 24
DEPTHS = {"rq": 3, "vq": 1, "hq": 5}


def make_stack(kind: str, seed: int = 0, **settings) -> QuantizerStack:
    torch.manual_seed(seed)
    depth = 3 if kind == "rq" else None
    stack = build_stack(
        kind,
        z_channels=Z_CHANNELS,
        llm_width=LLM_WIDTH,
        num_codes=NUM_CODES,
        depth=depth,
        settings=QuantizerSettings(**settings),
    )
    c_l = torch.randn(NUM_CODES, LLM_WIDTH, generator=torch.Generator().manual_seed(1)) * 0.3
    stack.quantizer.install(c_l)
    return stack


def latent(seed: int = 2, b: int = 2, h: int = 4, w: int = 4, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(b, Z_CHANNELS, h, w, generator=torch.Generator().manual_seed(seed)) * scale


def warm_up(stack: QuantizerStack, steps: int = 2) -> None:
    """A few training steps so that running norms are measured and the codebook has moved."""
    stack.train()
    opt = torch.optim.SGD(stack.parameters(), lr=0.05)
    for step in range(steps):
        z = latent(seed=30 + step)
        out = stack(z)
        target = torch.cat([z] * (stack.decoder_in_channels // Z_CHANNELS), dim=1)
        loss = F.mse_loss(out.z_q, target) + out.commit_loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_unknown_stacking_lists_the_known_names():
    with pytest.raises(ConfigError, match=r"stacking 'pq' is unknown; choose one of \['hq', 'rq', 'vq'\]"):
        build_stack("pq", z_channels=4, llm_width=8, num_codes=4)
    assert sorted(STACKS) == ["hq", "rq", "vq"]


@pytest.mark.parametrize(
    ("kind", "depth", "message"),
    [
        ("rq", None, "stacking 'rq' needs depth"),
        ("vq", 4, "stacking 'vq' has depth 1; got depth=4"),
        ("hq", 4, "stacking 'hq' has 5 codes per top position"),
    ],
)
def test_depth_conflicts_are_reported(kind, depth, message):
    with pytest.raises(ConfigError, match=message):
        build_stack(kind, z_channels=4, llm_width=8, num_codes=4, depth=depth)


@pytest.mark.parametrize("kind", ["rq", "vq", "hq"])
def test_shapes(kind):
    stack = make_stack(kind)
    z = latent(h=4, w=6)  # not square: (h, w) is carried explicitly
    out = stack(z)
    expected_code_shape = (2, 3, DEPTHS[kind]) if kind == "hq" else (4, 6, DEPTHS[kind])
    assert stack.code_shape((4, 6)) == expected_code_shape
    assert stack.code_depth == DEPTHS[kind]
    assert out.codes.shape == (2, *expected_code_shape)
    assert out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < NUM_CODES
    c_dec = 2 * Z_CHANNELS if kind == "hq" else Z_CHANNELS
    assert stack.decoder_in_channels == c_dec
    assert out.z_q.shape == (2, c_dec, 4, 6)
    assert out.commit_loss.shape == () and float(out.commit_loss.detach()) > 0
    assert stack.get_codes_embeddings(out.codes).shape == (2, *expected_code_shape[:2], LLM_WIDTH)


@pytest.mark.parametrize("kind", ["rq", "vq", "hq"])
def test_decode_codes_equals_the_eval_forward(kind):
    stack = make_stack(kind)
    warm_up(stack)
    stack.eval()
    with torch.no_grad():
        out = stack(latent(seed=5))
        assert torch.equal(stack.decode_codes(out.codes), out.z_q)


@pytest.mark.parametrize("kind", ["rq", "hq"])
def test_frozen_mode_never_writes_the_codebook(kind):
    stack = make_stack(kind, mode="frozen")
    buffers = {k: v.clone() for k, v in stack.quantizer.codebook_buffers().items() if k != "feature_norm"}
    warm_up(stack, steps=3)
    for name, before in buffers.items():
        assert torch.equal(stack.quantizer.codebook_buffers()[name], before), name


def test_stacks_reject_bad_inputs():
    with pytest.raises(ConfigError, match=r"even latent grid.*\(3, 4\)"):
        make_stack("hq")(latent(h=3, w=4))
    with pytest.raises(ValueError, match=r"expects z \(b, 8, h, w\)"):
        make_stack("rq")(torch.zeros(1, 4, 4, 4))
    with pytest.raises(UserError, match=r"expects codes \(b, h, w, 5\)"):
        make_stack("hq").decode_codes(torch.zeros(1, 2, 2, 3, dtype=torch.long))


# ----- hq layout --------------------------------------------------------------------------------


def decoded_halves(stack: HierarchicalStack, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        z_q = stack.decode_codes(codes)
    return z_q[:, :Z_CHANNELS], z_q[:, Z_CHANNELS:]  # (top, bottom) channels, each (b, c, h, w)


def test_hq_code_layout_per_top_position():
    stack = make_stack("hq")
    warm_up(stack)
    stack.eval()
    codes = torch.randint(0, NUM_CODES, (1, 2, 2, 5), generator=torch.Generator().manual_seed(0))
    top, bottom = decoded_halves(stack, codes)
    for y_top in range(2):
        for x_top in range(2):
            for slot, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)], start=1):
                changed = codes.clone()
                changed[0, y_top, x_top, slot] = (codes[0, y_top, x_top, slot] + 1) % NUM_CODES
                top2, bottom2 = decoded_halves(stack, changed)
                assert torch.equal(top2, top)  # a bottom code never touches the top half
                differs = (bottom2 != bottom).any(dim=1)[0]  # (h, w)
                expected = torch.zeros(4, 4, dtype=torch.bool)
                expected[2 * y_top + i, 2 * x_top + j] = True
                assert torch.equal(differs, expected), (y_top, x_top, slot)
            changed = codes.clone()
            changed[0, y_top, x_top, 0] = (codes[0, y_top, x_top, 0] + 1) % NUM_CODES
            top2, bottom2 = decoded_halves(stack, changed)
            assert torch.equal(bottom2, bottom)  # the top code only feeds the top half
            differs = (top2 != top).any(dim=1)[0]
            expected = torch.zeros(4, 4, dtype=torch.bool)
            expected[2 * y_top : 2 * y_top + 2, 2 * x_top : 2 * x_top + 2] = True
            assert torch.equal(differs, expected)


def test_hq_top_codes_quantize_the_pixel_unshuffled_grid():
    stack = make_stack("hq")
    warm_up(stack)
    stack.eval()
    z = latent(seed=6)
    with torch.no_grad():
        out = stack(z)
        top_tokens = rearrange(F.pixel_unshuffle(z, 2), "b c h w -> b (h w) c")
        top = stack.quantizer(top_tokens)
    assert torch.equal(out.codes[..., 0], rearrange(top.codes, "b (h w) 1 -> b h w", h=2, w=2))


def test_hq_splits_the_decay_over_its_two_quantizer_calls():
    stack = make_stack("hq", decay=0.81)
    assert stack.quantizer.decay_per_step == 0.81
    assert stack.quantizer.decay_per_layer == pytest.approx(0.9)


# ----- gradient scale ---------------------------------------------------------------------------


def identity_path(stack: QuantizerStack, z: torch.Tensor) -> torch.Tensor:
    """The stack's decoder input with quantization replaced by the identity (scales cancel)."""
    if isinstance(stack, HierarchicalStack):
        proj = stack.quantizer.projection
        top_tokens = rearrange(F.pixel_unshuffle(z, 2), "b c h w -> b (h w) c")
        top_z = F.pixel_shuffle(rearrange(proj.proj_out(proj.proj_in(top_tokens)), "b (h w) c -> b c h w", h=2), 2)
        residual = rearrange(z - top_z.detach(), "b c h w -> b (h w) c")
        bottom = stack.bottom_projection
        bottom_z = rearrange(bottom.proj_out(bottom.proj_in(residual)), "b (h w) c -> b c h w", h=4)
        return torch.cat([top_z, bottom_z], dim=1)
    proj = stack.quantizer.projection
    tokens = rearrange(z, "b c h w -> b (h w) c")
    return rearrange(proj.proj_out(proj.proj_in(tokens)), "b (h w) c -> b c h w", h=4)


@pytest.mark.parametrize("kind", ["rq", "hq"])
def test_encoder_gradient_is_one_x(kind):
    stack = make_stack(kind)
    warm_up(stack)
    stack.train()
    z = latent(seed=8).requires_grad_(True)
    out = stack(z)
    grad_out = torch.randn_like(out.z_q)
    (out.z_q * grad_out).sum().backward()
    grad_quantized = z.grad.clone()
    z.grad = None
    (identity_path(stack, z) * grad_out).sum().backward()
    torch.testing.assert_close(grad_quantized, z.grad)  # 1x: the library alone would give depth x
    projections = [stack.quantizer.projection]
    if isinstance(stack, HierarchicalStack):
        projections.append(stack.bottom_projection)
    for projection in projections:
        assert float(projection.proj_out.weight.grad.abs().sum()) > 0
        assert float(projection.proj_in.weight.grad.abs().sum()) > 0


def test_rq_gradient_does_not_grow_with_depth():
    grads = []
    for depth in (1, 4):
        torch.manual_seed(0)
        stack = build_stack("rq", z_channels=Z_CHANNELS, llm_width=LLM_WIDTH, num_codes=NUM_CODES, depth=depth)
        stack.quantizer.install(torch.randn(NUM_CODES, LLM_WIDTH, generator=torch.Generator().manual_seed(1)))
        z = latent(seed=8).requires_grad_(True)
        out = stack(z)
        (out.z_q * torch.ones_like(out.z_q)).sum().backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("kind", ["rq", "hq"])
def test_safetensors_round_trip_keeps_one_shared_codebook(kind, tmp_path):
    from safetensors.torch import load_model, save_model

    stack = make_stack(kind)
    warm_up(stack)
    save_model(stack, str(tmp_path / "stack.safetensors"))  # dedupes the per-layer codebook keys
    reloaded = make_stack(kind, seed=9)
    load_model(reloaded, str(tmp_path / "stack.safetensors"))
    layers = list(reloaded.quantizer.rvq.layers)
    assert all(layer._codebook is layers[0]._codebook for layer in layers)
    for module in (stack, reloaded):
        module.eval()
    with torch.no_grad():
        z = latent(seed=11)
        assert torch.equal(stack(z).codes, reloaded(z).codes)
        assert torch.equal(stack(z).z_q, reloaded(z).z_q)
