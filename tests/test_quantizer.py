"""The quantizer adapter: library pin and facts, gradient scale, install/blend, freezing, norm matching,
precision. Tiny sizes (llm_width 16, 24 codes), CPU only.

Numbers measured on vector-quantize-pytorch 1.31.0 (the pinned version): a bare shared-codebook
ResidualVQ hands the encoder 4.0x the gradient at depth 4; writing only `embed` after a blend is undone
by one EMA step (relative distance to the blend ~1.0 here), writing `embed` and `embed_avg` keeps it
(~0.03 here, features far from the codes).
"""

from __future__ import annotations

import copy
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unicode_mllm.errors import ConfigError, UserError
from unicode_mllm.visual_tokenizer import (
    PINNED_VQ_VERSION,
    QuantizerSettings,
    StackedQuantizer,
    cast_except_quantizer,
    code_histogram,
    code_usage,
    installed_vq_version,
)

IN_CHANNELS, LLM_WIDTH, NUM_CODES = 8, 16, 24


def make_quantizer(depth: int = 2, seed: int = 0, **settings) -> StackedQuantizer:
    torch.manual_seed(seed)
    return StackedQuantizer(
        in_channels=IN_CHANNELS,
        llm_width=LLM_WIDTH,
        num_codes=NUM_CODES,
        depth=depth,
        settings=QuantizerSettings(**settings),
    )


def language_codebook(seed: int = 1, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(NUM_CODES, LLM_WIDTH, generator=torch.Generator().manual_seed(seed)) * scale


def features(seed: int = 2, b: int = 2, n: int = 16, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(b, n, IN_CHANNELS, generator=torch.Generator().manual_seed(seed)) * scale


# ----- the pinned library and the facts the adapter relies on -----------------------------------


def test_library_version_is_the_pinned_one():
    # Fails on an upgrade: re-check the library facts (this file) before moving the pin.
    assert PINNED_VQ_VERSION == "1.31.0"
    assert metadata.version("vector-quantize-pytorch") == PINNED_VQ_VERSION
    assert installed_vq_version() == PINNED_VQ_VERSION


def test_library_alone_gives_depth_times_the_gradient():
    # Reached through the adapter (only quantizer.py imports the library): the class of its ResidualVQ.
    residual_vq_cls = type(make_quantizer().rvq)
    torch.manual_seed(0)
    bare = residual_vq_cls(
        dim=LLM_WIDTH,
        num_quantizers=4,
        codebook_size=NUM_CODES,
        shared_codebook=True,
        decay=0.99,
        eps=1e-5,
        commitment_weight=0.0,
        rotation_trick=False,
        threshold_ema_dead_code=0,
        kmeans_init=False,
        quantize_dropout=False,
        sync_codebook=False,
    )
    x = torch.randn(2, 8, LLM_WIDTH, requires_grad=True)
    quantized, _, _ = bare(x)
    grad_out = torch.randn_like(quantized)
    (quantized * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, 4.0 * grad_out)


def test_library_defaults_that_the_adapter_overrides():
    vq_cls = type(make_quantizer().rvq.layers[0])
    plain = vq_cls(dim=LLM_WIDTH, codebook_size=NUM_CODES)
    assert plain._codebook.decay == 0.8
    assert plain.rotation_trick is True


def test_adapter_passes_every_behaviour_kwarg():
    q = make_quantizer(depth=3, decay=0.9, commitment_weight=0.5)
    layers = list(q.rvq.layers)
    codebook = layers[0]._codebook
    assert all(layer._codebook is codebook for layer in layers)  # one shared codebook
    assert all(layer.rotation_trick is False for layer in layers)
    assert all(layer.commitment_weight == 0.5 for layer in layers)
    assert codebook.threshold_ema_dead_code == 0
    assert codebook.use_ddp is False
    assert bool(codebook.initted)  # no k-means init pending
    assert q.rvq.quantize_dropout is False
    assert not q.rvq.has_projections  # the adapter owns proj_in / proj_out
    assert codebook.decay == pytest.approx(0.9 ** (1 / 3))
    assert codebook.embed.dtype == torch.float32


# ----- decay meaning ----------------------------------------------------------------------------


def test_decay_is_per_training_step():
    depth, decay = 3, 0.9
    q = make_quantizer(depth=depth, decay=decay)
    assert q.decay_per_step == decay
    assert q.decay_per_layer == pytest.approx(decay ** (1 / depth))
    x = features(b=2, n=16)
    q.train()
    q(x)
    # cluster_size starts at ones (sum v); each layer adds n_tokens counts. Decayed once per layer
    # with decay ** (1/d), the total is exactly one step of `decay`.
    n_tokens = x.shape[0] * x.shape[1]
    total = float(q.codebook_buffers()["cluster_size"].sum())
    assert total == pytest.approx(decay * NUM_CODES + (1 - decay) * n_tokens, rel=1e-5)


# ----- gradient scale ---------------------------------------------------------------------------


def test_encoder_gradient_is_one_x_and_reaches_proj_out():
    torch.manual_seed(0)
    x = features(scale=3.0)
    grad_out = torch.randn_like(x)

    def encoder_grad(depth: int) -> tuple[torch.Tensor, StackedQuantizer]:
        q = make_quantizer(depth=depth, seed=0)
        q.install(language_codebook())
        q.train()
        x_leaf = x.clone().requires_grad_(True)
        (q(x_leaf).z_q * grad_out).sum().backward()  # reconstruction path only
        return x_leaf.grad, q

    grad_d4, q4 = encoder_grad(4)
    grad_d1, _ = encoder_grad(1)
    torch.testing.assert_close(grad_d4, grad_d1)  # same projections: depth does not scale it

    # The straight-through gradient is that of the network with quantization removed.
    x_leaf = x.clone().requires_grad_(True)
    (q4.projection.proj_out(q4.projection.proj_in(x_leaf)) * grad_out).sum().backward()
    torch.testing.assert_close(grad_d4, x_leaf.grad)
    ratio = float(grad_d4.norm() / x_leaf.grad.norm())
    assert ratio == pytest.approx(1.0, abs=1e-5)  # measured 1.0 (the library alone: 4.0)

    assert q4.projection.proj_out.weight.grad is not None
    assert float(q4.projection.proj_out.weight.grad.abs().sum()) > 0
    assert float(q4.projection.proj_in.weight.grad.abs().sum()) > 0


def test_commit_loss_reaches_the_encoder_and_is_relative():
    q = make_quantizer(depth=2, commitment_weight=0.25)
    q.install(language_codebook())
    codebook = q.export_codebook()  # the codes are chosen before the EMA update
    x = features().requires_grad_(True)
    out = q(x)
    out.commit_loss.backward()
    assert float(x.grad.abs().sum()) > 0
    # Recompute: weight * mean_d E||x - sum_{k<=d} q_k||^2 / target_norm^2 in LLM units.
    q.eval()
    with torch.no_grad():
        x_llm = q.projection.to_llm(x.detach(), q.target_norm)
        partial = torch.zeros_like(x_llm)
        errors = []
        for k in range(2):
            partial = partial + codebook[out.codes[..., k]]
            errors.append(((x_llm - partial) ** 2).sum(-1).mean())
        expected = 0.25 * torch.stack(errors).mean() / q.target_norm**2
    torch.testing.assert_close(out.commit_loss.detach(), expected, rtol=1e-4, atol=1e-6)


def test_commit_loss_is_the_same_with_a_frozen_codebook():
    # The EMA path takes the library's per-layer loss, the frozen path computes it itself.
    q_ema = make_quantizer(depth=3)
    q_ema.install(language_codebook())
    q_frozen = copy.deepcopy(q_ema)
    q_frozen.freeze_codebook = True
    x = features()
    out_ema, out_frozen = q_ema(x), q_frozen(x)
    assert torch.equal(out_ema.codes, out_frozen.codes)
    torch.testing.assert_close(out_ema.commit_loss, out_frozen.commit_loss, rtol=1e-5, atol=1e-7)


# ----- install, blend, distance -----------------------------------------------------------------


def test_install_gives_distance_zero_and_sets_target_norm():
    q = make_quantizer()
    c_l = language_codebook()
    assert q.relative_distance(c_l) > 0.5
    q.install(c_l)
    assert q.relative_distance(c_l) == 0.0
    assert torch.equal(q.codebook, c_l)
    assert float(q.target_norm) == pytest.approx(float(c_l.norm(dim=-1).mean()))


def test_blend_survives_one_ema_step_and_embed_only_does_not():
    c_l, c_0, x = language_codebook(seed=1), language_codebook(seed=5), features(b=4)

    def distance_after_one_step(write_both: bool) -> tuple[float, float]:
        q = make_quantizer(depth=2, seed=3)
        q.install(c_0)
        q(x)  # statistics now hold real counts
        before = q.export_codebook()
        target = 0.5 * before + 0.5 * c_l
        if write_both:
            q.blend_toward(c_l, 0.5)
        else:  # what `rvq.codebook = ...` / the VectorQuantize setter amounts to
            with torch.no_grad():
                q.rvq.layers[0]._codebook.embed.copy_(target[None])
        assert q.relative_distance(target) < 1e-6
        q(x)
        return q.relative_distance(target), q.relative_distance(before)

    blended, blended_to_old = distance_after_one_step(write_both=True)
    embed_only, embed_only_to_old = distance_after_one_step(write_both=False)
    assert blended < 0.1  # measured 0.033
    assert embed_only > 0.5  # measured 1.01: back at the pre-blend codebook
    assert embed_only_to_old < 0.1
    assert blended_to_old > 0.5
    assert blended < embed_only / 10


def test_blend_weights_follow_the_paper():
    q = make_quantizer()
    c_0, c_l = language_codebook(seed=5), language_codebook(seed=1)
    q.install(c_0)
    q.blend_toward(c_l, 0.25)
    torch.testing.assert_close(q.codebook, 0.25 * c_0 + 0.75 * c_l)
    q.blend_toward(c_l, 1.0)  # lam = 1 keeps C
    torch.testing.assert_close(q.codebook, 0.25 * c_0 + 0.75 * c_l)
    q.blend_toward(c_l, 0.0)
    assert q.relative_distance(c_l) == 0.0


@pytest.mark.parametrize("mode", ["frozen", "separate"])
def test_blend_is_rejected_where_the_mode_forbids_it(mode):
    q = make_quantizer(mode=mode)
    with pytest.raises(ConfigError, match=f"codebook_mode='{mode}' never blends"):
        q.blend_toward(language_codebook(), 0.5)


def test_install_and_blend_check_shapes_and_weight():
    q = make_quantizer()
    with pytest.raises(ConfigError, match=r"shape \(24, 8\).*\(24, 16\)"):
        q.install(torch.zeros(NUM_CODES, 8))
    with pytest.raises(ConfigError, match="lam must lie in"):
        q.blend_toward(language_codebook(), 1.5)


# ----- freezing and the four modes --------------------------------------------------------------


def train_steps(q: StackedQuantizer, steps: int = 3) -> None:
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    for step in range(steps):
        x = features(seed=10 + step)
        out = q(x)
        loss = F.mse_loss(out.z_q, x) + out.commit_loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def codebook_state(q: StackedQuantizer) -> dict[str, torch.Tensor]:
    buffers = q.codebook_buffers()
    return {k: buffers[k].clone() for k in ("embed", "embed_avg", "cluster_size", "target_norm")}


@pytest.mark.parametrize("how", ["mode", "flag", "eval"])
def test_frozen_codebook_stays_bit_identical(how):
    q = make_quantizer(depth=2, mode="frozen" if how == "mode" else "language_driven")
    q.install(language_codebook())
    if how != "mode":
        # Tail epochs: EMA training (uneven cluster sizes), a blend, then a fixed codebook. With uneven
        # counts, recomputing embed = embed_avg / n (what a training-mode library forward does even
        # with freeze_codebook=True) changes last bits, so the adapter must not let it run.
        train_steps(q, steps=2)
        q.blend_toward(language_codebook(), 0.3)
    q.freeze_codebook = how == "flag" or how == "mode"
    before = codebook_state(q)
    proj_before = q.projection.proj_in.weight.clone()
    if how == "eval":
        q.eval()
        for step in range(3):
            q(features(seed=10 + step))
    else:
        train_steps(q)
        assert not torch.equal(q.projection.proj_in.weight, proj_before)  # the encoder side trained
    after = codebook_state(q)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_unfrozen_codebook_moves_under_ema():
    q = make_quantizer(depth=2)
    c_l = language_codebook()
    q.install(c_l)
    train_steps(q)
    assert q.relative_distance(c_l) > 1e-4


def test_forward_flag_overrides_the_attribute():
    q = make_quantizer()
    q.install(language_codebook())
    before = q.export_codebook()
    q(features(), freeze_codebook=True)
    assert torch.equal(q.codebook, before)
    q(features())
    assert not torch.equal(q.codebook, before)


def test_separate_mode_random_and_kmeans_init():
    q = make_quantizer(mode="separate", target_norm=2.0)
    q.init_codebook_randomly(generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(q.codebook.norm(dim=-1), torch.full((NUM_CODES,), 2.0))

    x = features(b=4, n=32, scale=5.0)

    def distortion(iters: int) -> float:
        qk = make_quantizer(mode="separate")
        qk.init_codebook_from_features(x, kmeans_iters=iters, generator=torch.Generator().manual_seed(0))
        qk.eval()
        with torch.no_grad():
            samples = qk.projection.to_llm(x, qk.target_norm).reshape(-1, LLM_WIDTH)
        return float(torch.cdist(samples, qk.codebook).min(dim=-1).values.pow(2).mean())

    assert distortion(10) < distortion(0)


def test_dual_mode_export_and_install_round_trip():
    q = make_quantizer(mode="dual")
    q.install(language_codebook())
    train_steps(q, steps=1)
    exported = q.export_codebook()
    exported += 0.0  # a copy: editing it leaves the quantizer alone
    llm_table = exported * 1.5  # "the LLM table" after its own update
    assert not torch.equal(q.codebook, llm_table)
    q.install(llm_table)
    assert q.relative_distance(llm_table) == 0.0
    q.blend_toward(language_codebook(), 0.5)  # dual may also be blended by the trainer


# ----- round trips and codes --------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 3])
def test_eval_forward_equals_decode_codes(depth):
    q = make_quantizer(depth=depth)
    q.install(language_codebook())
    train_steps(q, steps=1)  # running norm measured, codebook moved
    q.eval()
    with torch.no_grad():
        out = q(features(seed=7))
        assert out.codes.shape == (2, 16, depth) and out.codes.dtype == torch.long
        assert torch.equal(q.decode_codes(out.codes), out.z_q)
    # also with gradients on (the straight-through wrap keeps the value exactly)
    out_grad = q(features(seed=7))
    assert torch.equal(out_grad.z_q.detach(), out.z_q)


def test_get_codes_embeddings_sums_codebook_rows():
    q = make_quantizer(depth=3)
    q.install(language_codebook())
    codes = torch.tensor([[[0, 5, 23], [1, 1, 1]]])
    emb = q.get_codes_embeddings(codes)
    assert emb.shape == (1, 2, LLM_WIDTH)
    torch.testing.assert_close(emb[0, 0], q.codebook[0] + q.codebook[5] + q.codebook[23])
    torch.testing.assert_close(emb[0, 1], 3 * q.codebook[1])


def test_decode_rejects_bad_codes():
    q = make_quantizer(depth=2)
    with pytest.raises(UserError, match=r"codes must lie in \[0, 24\)"):
        q.decode_codes(torch.tensor([[[0, 24]]]))
    with pytest.raises(UserError, match=r"expected codes \(b, n, 2\)"):
        q.decode_codes(torch.zeros(1, 3, 4, dtype=torch.long))
    with pytest.raises(UserError, match="int64"):
        q.get_codes_embeddings(torch.zeros(1, 2, dtype=torch.int32))


def test_codes_match_nearest_rows_in_llm_units():
    q = make_quantizer(depth=1)
    q.install(language_codebook())
    train_steps(q, steps=1)
    q.eval()
    x = features(seed=9)
    with torch.no_grad():
        out = q(x)
        x_llm = q.projection.to_llm(x, q.target_norm)
        expected = torch.cdist(x_llm, q.codebook[None].expand(2, -1, -1)).argmin(dim=-1)
    assert torch.equal(out.codes[..., 0], expected)


# ----- norm matching ----------------------------------------------------------------------------


def test_norm_matching_is_scale_invariant_and_in_llm_units():
    c_l = language_codebook(scale=0.05)  # a tiny LLaMA's embedding scale
    q_small, q_large = make_quantizer(depth=2), make_quantizer(depth=2)
    for q in (q_small, q_large):
        q.install(c_l)
        with torch.no_grad():
            q.projection.proj_in.bias.zero_()  # so that proj_in(1000 x) = 1000 proj_in(x)
    x = features(scale=1.0)
    out_small, out_large = q_small(x), q_large(1000.0 * x)  # first training batch sets the running norm
    assert torch.equal(out_small.codes, out_large.codes)
    torch.testing.assert_close(out_small.commit_loss, out_large.commit_loss, rtol=1e-4, atol=1e-6)
    q_large.eval()
    with torch.no_grad():
        x_llm = q_large.projection.to_llm(1000.0 * x, q_large.target_norm)
    mean_norm = float(x_llm.norm(dim=-1).mean())
    assert mean_norm == pytest.approx(float(c_l.norm(dim=-1).mean()), rel=1e-4)


def test_running_norm_follows_the_features():
    q = make_quantizer(feature_norm_decay=0.5)
    q.install(language_codebook())
    assert float(q.projection.feature_norm) == 0.0  # unmeasured: scale 1
    x = features()
    q(x)
    with torch.no_grad():
        first = float(q.projection.proj_in(x).norm(dim=-1).mean())
    assert float(q.projection.feature_norm) == pytest.approx(first, rel=1e-5)
    q(3.0 * x)
    with torch.no_grad():
        third = float(q.projection.proj_in(3.0 * x).norm(dim=-1).mean())
    assert float(q.projection.feature_norm) == pytest.approx(0.5 * first + 0.5 * third, rel=1e-5)


@pytest.mark.parametrize("norm_matching", ["running_ratio", "none"])
def test_ema_codebook_stays_comparable_with_the_language_codebook(norm_matching):
    c_l = language_codebook(scale=0.05)  # row norms ~0.2
    q = make_quantizer(depth=1, decay=0.5, norm_matching=norm_matching)
    q.install(c_l)
    for step in range(10):
        q(features(seed=20 + step, b=4, scale=50.0))  # encoder features with norms ~140
    used = code_histogram(q(features(seed=40, b=4, scale=50.0), freeze_codebook=True).codes, NUM_CODES)[0] > 0
    ratio = float(q.codebook[used].norm(dim=-1).mean() / c_l.norm(dim=-1).mean())
    if norm_matching == "running_ratio":
        assert 0.2 < ratio < 2.0
    else:
        assert ratio > 10.0  # the codebook drifted to feature scale, far from C_L


# ----- precision --------------------------------------------------------------------------------


class TinyTokenizerSide(nn.Module):
    """An encoder conv, the quantizer, a decoder conv (channel-last tokens for the quantizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, IN_CHANNELS)
        self.quantizer = make_quantizer(depth=2)
        self.decoder = nn.Linear(IN_CHANNELS, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quantizer(self.encoder(x))
        return self.decoder(out.z_q) + out.commit_loss


def test_codebook_buffers_stay_fp32_under_autocast():
    model = TinyTokenizerSide()
    model.quantizer.install(language_codebook())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        z = model.encoder(torch.randn(2, 16, 4))
        assert z.dtype == torch.bfloat16
        out = model.quantizer(z)
    assert out.z_q.dtype == torch.bfloat16  # back in the caller's dtype
    assert out.commit_loss.dtype == torch.float32
    for name, buffer in model.quantizer.codebook_buffers().items():
        assert buffer.dtype == torch.float32, name
    for name, param in model.quantizer.named_parameters():
        assert param.dtype == torch.float32, name


def test_cast_except_quantizer_keeps_the_quantizer_fp32():
    model = TinyTokenizerSide()
    model.quantizer.install(language_codebook())
    cast_except_quantizer(model, torch.bfloat16)
    assert model.encoder.weight.dtype == torch.bfloat16
    assert model.decoder.weight.dtype == torch.bfloat16
    for name, tensor in [*model.quantizer.named_parameters(), *model.quantizer.named_buffers()]:
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
    y = model(torch.randn(2, 16, 4, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert model.quantizer.codebook.dtype == torch.float32


# ----- settings and usage -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mode": "shared"}, r"mode 'shared' is unknown; choose one of \['dual'"),
        ({"norm_matching": "layernorm"}, "norm_matching 'layernorm' is unknown"),
        ({"decay": 1.0}, "decay must lie strictly between 0 and 1"),
        ({"eps": 0.0}, "eps must be positive"),
        ({"commitment_weight": -1.0}, "commitment_weight must be >= 0"),
    ],
)
def test_settings_are_validated(settings, message):
    with pytest.raises(ConfigError, match=message):
        make_quantizer(**settings)


def test_sync_codebook_must_be_an_explicit_bool():
    with pytest.raises(ConfigError, match="sync_codebook must be an explicit bool"):
        StackedQuantizer(in_channels=4, llm_width=8, num_codes=4, depth=1, sync_codebook=None)


def test_code_histogram_and_usage_per_depth():
    codes = torch.tensor([[[0, 1], [0, 2]], [[3, 1], [0, 1]]])  # (b=2, n=2, d=2)
    hist = code_histogram(codes, num_codes=4)
    assert hist.tolist() == [[3, 0, 0, 1], [0, 3, 1, 0]]
    usage = code_usage(hist)
    assert usage.unique == (2, 2)
    p = torch.tensor([0.75, 0.25])
    expected = float(torch.exp(-(p * p.log()).sum()))
    assert usage.perplexity[0] == pytest.approx(expected)
    assert usage.perplexity[1] == pytest.approx(expected)
