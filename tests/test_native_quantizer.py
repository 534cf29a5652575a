"""The native quantizer backend against the library backend: codes, EMA buffers, chunked search,
install/blend, gradient scale, freezing, DDP statistics, stacks. Tiny sizes (llm_width 16, 24 codes), CPU.

The library side is always reached through the adapter (`StackedQuantizer(backend="library")`), the
only module allowed to import vector-quantize-pytorch (pinned 1.31.0). Measured here on 1.31.0: the
two backends pick identical codes and their buffers agree to <= 3.5e-7 (max abs error / max abs value)
after 5 EMA steps at depths 1-4; the tests allow 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from unicode_mllm.errors import ConfigError
from unicode_mllm.visual_tokenizer import QuantizerSettings, StackedQuantizer, build_stack
from unicode_mllm.visual_tokenizer.native_quantizer import (
    NativeResidualQuantizer,
    nearest_codes,
    principal_basis,
    smoothed_cluster_size,
)

IN_CHANNELS, LLM_WIDTH, NUM_CODES = 8, 16, 24
EMA_BUFFERS = ("embed", "embed_avg", "cluster_size")


def make_quantizer(backend: str, depth: int = 2, seed: int = 0, **settings) -> StackedQuantizer:
    torch.manual_seed(seed)
    return StackedQuantizer(
        in_channels=IN_CHANNELS,
        llm_width=LLM_WIDTH,
        num_codes=NUM_CODES,
        depth=depth,
        settings=QuantizerSettings(backend=backend, **settings),
    )


def make_pair(depth: int, **settings) -> tuple[StackedQuantizer, StackedQuantizer]:
    """A library and a native quantizer with identical projections and codebook (C_L installed)."""
    library, native = make_quantizer("library", depth, **settings), make_quantizer("native", depth, **settings)
    native.load_state_dict(
        {k: v for k, v in library.state_dict().items() if not k.startswith("rvq.")}, strict=False
    )  # projections and norms (the same seed gives the same ones; this makes it independent of that)
    c_l = language_codebook()
    library.install(c_l)
    native.install(c_l)
    return library, native


def language_codebook(seed: int = 1, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(NUM_CODES, LLM_WIDTH, generator=torch.Generator().manual_seed(seed)) * scale


def features(seed: int = 2, b: int = 2, n: int = 16, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(b, n, IN_CHANNELS, generator=torch.Generator().manual_seed(seed)) * scale


def train_step(q: StackedQuantizer, opt: torch.optim.Optimizer, step: int):
    x = features(seed=10 + step)
    out = q(x)
    loss = F.mse_loss(out.z_q, x) + out.commit_loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return out


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str) -> None:
    """max |a - e| <= rel * max |e| (relative to the tensor's scale, not element by element)."""
    error = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert error <= rel * scale, f"{name}: max abs error {error:.3g} > {rel} x max abs {scale:.3g}"


# ----- layout and settings ----------------------------------------------------------------------


def test_buffers_mirror_the_library_layout():
    library, native = make_quantizer("library", depth=3), make_quantizer("native", depth=3)
    library_buffers = list(library.rvq.layers[0]._codebook.named_buffers())
    native_buffers = list(native.rvq.named_buffers())
    assert [name for name, _ in native_buffers] == [name for name, _ in library_buffers]
    assert [name for name, _ in native_buffers] == ["initted", "cluster_size", "embed_avg", "embed"]
    for (name, lib), (_, nat) in zip(library_buffers, native_buffers, strict=True):
        assert nat.shape == lib.shape and nat.dtype == lib.dtype, name
    assert native.codebook_buffers()["embed"].shape == (1, NUM_CODES, LLM_WIDTH)
    assert bool(native.rvq.initted)
    # Same seed, same initial codebook: the native init is the library's Kaiming-uniform draw.
    assert torch.equal(native.codebook, library.codebook)
    assert torch.equal(native.rvq.embed_avg, native.rvq.embed)
    assert torch.equal(native.rvq.cluster_size, torch.ones(1, NUM_CODES))


def test_backend_setting_selects_and_configures_the_quantizer():
    assert QuantizerSettings().backend == "library"
    assert not isinstance(make_quantizer("library").rvq, NativeResidualQuantizer)
    native = make_quantizer("native", depth=3, decay=0.9, eps=1e-4, commitment_weight=0.5, native_chunk_size=7)
    assert isinstance(native.rvq, NativeResidualQuantizer) and native.backend == "native"
    assert native.rvq.chunk_size == 7
    assert native.rvq.decay == pytest.approx(0.9 ** (1 / 3))  # split over layers, as for the library
    assert native.rvq.eps == 1e-4
    assert native.rvq.commitment_weight == 0.5
    assert native.rvq.sync_codebook is False


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"backend": "faiss"}, r"backend 'faiss' is unknown; choose one of \['library', 'native'\]"),
        ({"backend": "native", "native_chunk_size": 0}, "native_chunk_size must be >= 1"),
    ],
)
def test_backend_settings_are_validated(settings, message):
    with pytest.raises(ConfigError, match=message):
        StackedQuantizer(in_channels=4, llm_width=8, num_codes=4, depth=1, settings=QuantizerSettings(**settings))


def test_smoothed_cluster_size_keeps_the_total_and_lifts_zeros():
    counts = torch.tensor([[3.0, 0.0, 1.0]])
    smoothed = smoothed_cluster_size(counts, eps=0.5)
    torch.testing.assert_close(smoothed, torch.tensor([[3.5, 0.5, 1.5]]) / 5.5 * 4.0)
    assert float(smoothed.sum()) == pytest.approx(4.0)


# ----- same codes, same statistics --------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_same_codes_as_the_library_in_train_and_eval(depth):
    library, native = make_pair(depth)
    opts = [torch.optim.SGD(q.parameters(), lr=0.1) for q in (library, native)]
    for step in range(3):  # training mode: each step also moves both codebooks
        out_library, out_native = (train_step(q, opt, step) for q, opt in zip((library, native), opts, strict=True))
        assert torch.equal(out_native.codes, out_library.codes), f"step {step}"
        assert out_native.codes.unique().numel() > 3  # a real search, not one code everywhere
    for q in (library, native):
        q.eval()
    with torch.no_grad():
        x = features(seed=50, n=32)
        assert torch.equal(native(x).codes, library(x).codes)
        # The codebooks differ by float rounding after the EMA steps, so the values are close, not equal.
        torch.testing.assert_close(native(x).z_q, library(x).z_q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_ema_buffers_match_the_library_after_k_steps(depth):
    library, native = make_pair(depth, decay=0.9)
    installed = native.export_codebook()
    opts = [torch.optim.SGD(q.parameters(), lr=0.1) for q in (library, native)]
    for step in range(5):
        for q, opt in zip((library, native), opts, strict=True):
            train_step(q, opt, step)
    assert native.relative_distance(installed) > 1e-3  # the EMA really moved the codebook
    library_buffers, native_buffers = library.codebook_buffers(), native.codebook_buffers()
    for name in EMA_BUFFERS:
        assert native_buffers[name].dtype == torch.float32
        assert_relative_close(native_buffers[name], library_buffers[name], 1e-5, name)
    torch.testing.assert_close(
        native.projection.proj_in.weight, library.projection.proj_in.weight, rtol=1e-5, atol=1e-6
    )  # same gradients to the projections, step after step


def test_commit_loss_and_its_gradient_match_the_library():
    library, native = make_pair(depth=3)
    x = features(seed=3)
    grads, losses = [], []
    for q in (library, native):
        x_leaf = x.clone().requires_grad_(True)
        loss = q(x_leaf).commit_loss
        loss.backward()
        grads.append(x_leaf.grad)
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-8)
    assert float(grads[1].abs().sum()) > 0

    ema = make_pair(depth=3)[1]  # the frozen path computes the same quantity itself
    frozen = copy.deepcopy(ema)
    frozen.freeze_codebook = True
    out_ema, out_frozen = ema(x), frozen(x)
    assert torch.equal(out_ema.codes, out_frozen.codes)
    torch.testing.assert_close(out_ema.commit_loss, out_frozen.commit_loss, rtol=1e-5, atol=1e-7)


def test_decay_is_per_training_step():
    depth, decay = 3, 0.9
    q = make_quantizer("native", depth=depth, decay=decay)
    x = features(b=2, n=16)
    q(x)
    n_tokens = x.shape[0] * x.shape[1]
    total = float(q.codebook_buffers()["cluster_size"].sum())
    assert total == pytest.approx(decay * NUM_CODES + (1 - decay) * n_tokens, rel=1e-5)


# ----- the chunked search -----------------------------------------------------------------------


def test_chunked_search_equals_unchunked_and_cdist():
    generator = torch.Generator().manual_seed(4)
    x, codebook = (
        torch.randn(37, LLM_WIDTH, generator=generator),
        torch.randn(NUM_CODES, LLM_WIDTH, generator=generator),
    )
    whole = nearest_codes(x, codebook, chunk_size=37)
    assert torch.equal(whole, torch.cdist(x, codebook).argmin(dim=-1))
    for chunk_size in (1, 5, 36, 1000):
        assert torch.equal(nearest_codes(x, codebook, chunk_size=chunk_size), whole), chunk_size
    with pytest.raises(ValueError, match="chunk_size must be >= 1; got 0"):
        nearest_codes(x, codebook, chunk_size=0)


def test_chunk_size_does_not_change_a_training_step():
    chunked, whole = make_pair(depth=3, native_chunk_size=5)[1], make_pair(depth=3)[1]
    assert chunked.rvq.chunk_size == 5 and whole.rvq.chunk_size > 32
    x = features(seed=6)
    out_chunked, out_whole = chunked(x), whole(x)
    assert torch.equal(out_chunked.codes, out_whole.codes)
    for name in EMA_BUFFERS:
        assert torch.equal(chunked.codebook_buffers()[name], whole.codebook_buffers()[name]), name


def test_clamped_ties_resolve_to_the_first_code_like_the_library():
    # Near-duplicate codes of small norm: every squared distance falls under the library's 1e-8
    # clamp, so the search must return the first index, as the library's cdist + argmax does.
    library, native = make_pair(depth=2)
    generator = torch.Generator().manual_seed(12)
    base = torch.randn(LLM_WIDTH, generator=generator) * 0.01
    codebook = base + torch.randn(NUM_CODES, LLM_WIDTH, generator=generator) * 1e-6
    library.install(codebook)
    native.install(codebook)
    x_llm = codebook[[3, 7, 11, 23]].reshape(1, 4, LLM_WIDTH)
    for q in (library, native):
        q.eval()
    codes_library, codes_native = library.quantize_llm(x_llm)[1], native.quantize_llm(x_llm)[1]
    assert torch.equal(codes_native, codes_library)
    assert codes_native[..., 0].tolist() == [[0, 0, 0, 0]]


# ----- install, blend, freezing -----------------------------------------------------------------


def test_install_and_blend_survive_an_ema_step():
    c_l, c_0, x = language_codebook(seed=1), language_codebook(seed=5), features(b=4)

    def distance_after_one_step(write_both: bool) -> tuple[float, float]:
        q = make_quantizer("native", depth=2, seed=3)
        q.install(c_0)
        assert q.relative_distance(c_0) == 0.0
        q(x)  # statistics now hold real counts
        before = q.export_codebook()
        target = 0.5 * before + 0.5 * c_l
        if write_both:
            q.blend_toward(c_l, 0.5)
        else:  # writing `embed` alone: the next step recomputes it from embed_avg
            with torch.no_grad():
                q.rvq.embed.copy_(target[None])
        assert q.relative_distance(target) < 1e-6
        q(x)
        return q.relative_distance(target), q.relative_distance(before)

    blended, blended_to_old = distance_after_one_step(write_both=True)
    embed_only, embed_only_to_old = distance_after_one_step(write_both=False)
    assert blended < 0.1  # the blend stays where it was put
    assert embed_only > 0.5 and embed_only_to_old < 0.1  # same semantics as the library's buffers
    assert blended_to_old > 0.5


@pytest.mark.parametrize("how", ["mode", "flag", "eval"])
def test_frozen_native_codebook_stays_bit_identical(how):
    q = make_quantizer("native", depth=2, mode="frozen" if how == "mode" else "language_driven")
    q.install(language_codebook())
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    if how != "mode":
        for step in range(2):  # uneven counts, so a recomputation of embed would change bits
            train_step(q, opt, step)
        q.blend_toward(language_codebook(), 0.3)
    q.freeze_codebook = how in ("flag", "mode")
    before = {k: v.clone() for k, v in q.codebook_buffers().items() if k != "feature_norm"}
    if how == "eval":
        q.eval()
    for step in range(3):
        train_step(q, opt, 2 + step)
    for name, value in before.items():
        assert torch.equal(q.codebook_buffers()[name], value), name


def test_native_module_alone_freezes_and_is_quiet_in_eval():
    torch.manual_seed(0)
    rvq = NativeResidualQuantizer(dim=LLM_WIDTH, codebook_size=NUM_CODES, depth=2, decay=0.9)
    x = torch.randn(2, 5, LLM_WIDTH)
    before = copy.deepcopy(rvq.state_dict())
    _, codes, losses = rvq(x, freeze_codebook=True)
    assert codes.shape == (2, 5, 2) and losses.shape == (2,) and float(losses.min()) > 0
    assert all(torch.equal(before[k], v) for k, v in rvq.state_dict().items())
    rvq.eval()
    _, _, losses = rvq(x)
    assert torch.equal(losses, torch.zeros(2))
    rvq.train()
    rvq(x)
    assert not torch.equal(before["embed"], rvq.embed)


def test_native_buffers_stay_fp32_under_autocast():
    q = make_quantizer("native")
    q.install(language_codebook())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = q(features().to(torch.bfloat16))
    assert out.z_q.dtype == torch.bfloat16
    for name, buffer in q.codebook_buffers().items():
        assert buffer.dtype == torch.float32, name


# ----- gradient scale ---------------------------------------------------------------------------


def test_encoder_gradient_is_one_x_and_reaches_proj_out():
    x = features(scale=3.0)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    q = make_quantizer("native", depth=4)
    q.install(language_codebook())
    x_leaf = x.clone().requires_grad_(True)
    (q(x_leaf).z_q * grad_out).sum().backward()  # reconstruction path only
    x_plain = x.clone().requires_grad_(True)
    (q.projection.proj_out(q.projection.proj_in(x_plain)) * grad_out).sum().backward()
    torch.testing.assert_close(x_leaf.grad, x_plain.grad)  # quantization removed: 1x, not 4x
    assert float(x_leaf.grad.norm() / x_plain.grad.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(q.projection.proj_out.weight.grad.abs().sum()) > 0


# ----- distributed statistics -------------------------------------------------------------------


def test_sync_all_reduces_the_step_statistics_once(monkeypatch):
    # A fake world of two ranks that saw the same batch: all_reduce doubles. Synced, one step must
    # equal an unsynced step on the batch given twice.
    calls = []

    def fake_all_reduce(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        tensor.mul_(2.0)

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    torch.manual_seed(0)
    synced = NativeResidualQuantizer(dim=LLM_WIDTH, codebook_size=NUM_CODES, depth=3, decay=0.9, sync_codebook=True)
    single = copy.deepcopy(synced)
    single.sync_codebook = False
    x = torch.randn(2, 8, LLM_WIDTH, generator=torch.Generator().manual_seed(5)) * 0.05
    _, codes_synced, _ = synced(x)
    _, codes_single, _ = single(torch.cat([x, x]))
    assert sorted(calls) == sorted([(NUM_CODES,), (NUM_CODES, LLM_WIDTH)])  # counts and sums, once per step
    assert torch.equal(torch.cat([codes_synced, codes_synced]), codes_single)
    for name in EMA_BUFFERS:
        torch.testing.assert_close(getattr(synced, name), getattr(single, name), rtol=1e-5, atol=1e-7)
    calls.clear()
    single(x)
    assert calls == []  # unsynced: no collective


# ----- stacks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rq", "hq"])
def test_native_stack_round_trips_decode_codes(kind):
    torch.manual_seed(0)
    stack = build_stack(
        kind,
        z_channels=IN_CHANNELS,
        llm_width=LLM_WIDTH,
        num_codes=NUM_CODES,
        depth=3 if kind == "rq" else None,
        settings=QuantizerSettings(backend="native"),
    )
    assert isinstance(stack.quantizer.rvq, NativeResidualQuantizer)
    stack.quantizer.install(language_codebook())
    installed = stack.quantizer.export_codebook()
    opt = torch.optim.SGD(stack.parameters(), lr=0.05)
    for step in range(2):
        z = torch.randn(2, IN_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(30 + step)) * 2.0
        out = stack(z)
        target = torch.cat([z] * (stack.decoder_in_channels // IN_CHANNELS), dim=1)
        loss = F.mse_loss(out.z_q, target) + out.commit_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert stack.quantizer.relative_distance(installed) > 1e-4  # EMA steps happened
    stack.eval()
    with torch.no_grad():
        out = stack(torch.randn(2, IN_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(11)) * 2.0)
        assert out.codes.shape == (2, *stack.code_shape((4, 4)))
        assert torch.equal(stack.decode_codes(out.codes), out.z_q)


def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        pair = []
        for backend in ("library", "native"):
            torch.manual_seed(0)
            q = StackedQuantizer(
                in_channels=IN_CHANNELS,
                llm_width=LLM_WIDTH,
                num_codes=NUM_CODES,
                depth=3,
                settings=QuantizerSettings(backend=backend, decay=0.9),
                sync_codebook=True,
            )
            q.install(language_codebook())
            pair.append(q)
        for step in range(3):
            x = features(seed=100 * rank + step)  # each rank sees its own batch
            for q in pair:
                q(x)
        torch.save({name: [q.codebook_buffers()[name] for q in pair] for name in EMA_BUFFERS}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes; test_sync_all_reduces_the_step_statistics_once covers the maths
def test_two_gloo_ranks_sync_like_the_library(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for name in EMA_BUFFERS:
        library_0, native_0 = ranks[0][name]
        library_1, native_1 = ranks[1][name]
        assert torch.equal(native_0, native_1), name  # one codebook across ranks
        assert torch.equal(library_0, library_1), name
        assert_relative_close(native_0, library_0, 1e-5, name)
    # Without the all-reduce rank 0's statistics would be its own batch's only.
    alone = make_quantizer("native", depth=3, decay=0.9)
    alone.install(language_codebook())
    for step in range(3):
        alone(features(seed=step))
    assert float((alone.codebook_buffers()["cluster_size"] - ranks[0]["cluster_size"][1]).abs().max()) > 0.1


# ----- low-dimensional search (search_dim) --------------------------------------------------------


def _reference_subspace_codes(x_llm: torch.Tensor, codebook: torch.Tensor, basis: torch.Tensor, depth: int):
    """Brute force: residuals in full width, nearest row by cdist after projecting both onto `basis`."""
    residual, codes = x_llm.reshape(-1, x_llm.shape[-1]), []
    projected_rows = codebook @ basis
    for _ in range(depth):
        idx = torch.cdist(residual @ basis, projected_rows).argmin(dim=-1)
        codes.append(idx)
        residual = residual - codebook[idx]
    return torch.stack(codes, dim=-1)


def test_principal_basis_is_orthonormal_and_spans_the_leading_directions():
    scales = torch.tensor([5.0, 4.0, 0.5, 0.1, 0.1, 0.1])
    rows = torch.randn(2000, 6, generator=torch.Generator().manual_seed(0)) * scales
    basis = principal_basis(rows, 2)
    assert basis.shape == (6, 2)
    torch.testing.assert_close(basis.T @ basis, torch.eye(2), atol=1e-5, rtol=0)
    # The two large-variance axes are the span: projecting e_0 and e_1 onto it keeps them.
    for axis in (0, 1):
        e = torch.zeros(6)
        e[axis] = 1.0
        torch.testing.assert_close(basis @ (basis.T @ e), e, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="search_dim must lie in"):
        principal_basis(rows, 7)


def test_subspace_search_picks_the_nearest_code_in_the_projected_space():
    q = make_quantizer("native", depth=3, search_dim=4).eval()
    c_l = language_codebook()
    q.install(c_l)
    basis = q.rvq.search_basis
    torch.testing.assert_close(basis, principal_basis(c_l, 4))  # install set it from C_L
    x_llm = torch.randn(2, 16, LLM_WIDTH, generator=torch.Generator().manual_seed(3)) * 0.5
    _, codes, _ = q.quantize_llm(x_llm)
    expected = _reference_subspace_codes(x_llm, c_l, basis, depth=3).reshape(codes.shape)
    assert torch.equal(codes, expected)
    # And it is a different search from the full-width one (the option does something).
    full = make_quantizer("native", depth=3).eval()
    full.install(c_l)
    assert not torch.equal(full.quantize_llm(x_llm)[1], codes)


def test_full_width_search_dim_equals_the_plain_search():
    # An orthonormal basis of the whole space preserves distances, so the codes cannot change.
    plain, projected = make_quantizer("native", depth=3).eval(), make_quantizer("native", depth=3, search_dim=LLM_WIDTH)
    projected.eval()
    c_l = language_codebook()
    plain.install(c_l)
    projected.install(c_l)
    x_llm = torch.randn(4, 16, LLM_WIDTH, generator=torch.Generator().manual_seed(4))
    assert torch.equal(plain.quantize_llm(x_llm)[1], projected.quantize_llm(x_llm)[1])


def test_subspace_search_trains_round_trips_and_keeps_the_basis_in_the_state_dict():
    q = make_quantizer("native", depth=2, search_dim=3)
    q.install(language_codebook())
    basis = q.rvq.search_basis.clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    for step in range(2):
        train_step(q, opt, step)
    assert torch.equal(q.rvq.search_basis, basis)  # EMA steps move rows, not the search subspace
    assert "rvq.search_basis" in q.state_dict()
    clone = make_quantizer("native", depth=2, search_dim=3, seed=5)
    clone.load_state_dict(q.state_dict())
    q.eval()
    clone.eval()
    x = features(seed=9)
    out, again = q(x), clone(x)
    assert torch.equal(out.codes, again.codes)
    assert torch.equal(q.decode_codes(out.codes), out.z_q)  # decode equals the eval forward


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"backend": "library", "search_dim": 4}, "needs quantizer.backend='native'"),
        ({"backend": "native", "search_dim": 0}, "search_dim must be >= 1"),
    ],
)
def test_search_dim_settings_are_validated(settings, message):
    with pytest.raises(ConfigError, match=message):
        QuantizerSettings(**settings).validate()


def test_search_dim_larger_than_the_codebook_width_is_refused():
    with pytest.raises(ConfigError, match="search_dim must lie in"):
        make_quantizer("native", search_dim=LLM_WIDTH + 1)
