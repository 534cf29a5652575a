"""'moments' norm matching: features mapped onto the codebook's per-channel statistics, exactly invertibly."""

from __future__ import annotations

import torch

from unicode_mllm.visual_tokenizer import QuantizerSettings, StackedQuantizer


def make(norm_matching: str) -> StackedQuantizer:
    torch.manual_seed(0)
    q = StackedQuantizer(
        in_channels=8, llm_width=16, num_codes=64, depth=1, settings=QuantizerSettings(norm_matching=norm_matching)
    )
    q.install(torch.randn(64, 16) * 0.5 + 0.3)
    return q


def collapsed_features() -> torch.Tensor:
    # A shared dominant direction plus small variation: what a fresh encoder tends to emit.
    torch.manual_seed(1)
    return torch.randn(1, 1, 8) * 5 + 0.05 * torch.randn(4, 32, 8)


def test_moments_match_codebook_statistics_and_invert():
    q = make("moments")
    x = collapsed_features()
    q.train()
    q.projection._update_feature_norm(q.projection.proj_in(x))
    x_llm = q.projection.normalize(q.projection.proj_in(x), q.target_norm)
    flat = x_llm.reshape(-1, 16)
    assert torch.allclose(flat.mean(0), q.projection.target_mean, atol=1e-4)
    assert torch.allclose(flat.std(0, unbiased=False), q.projection.target_std, rtol=1e-2)
    assert torch.allclose(
        q.projection.from_llm(x_llm, q.target_norm), q.projection.proj_out(q.projection.proj_in(x)), atol=1e-4
    )


def test_moments_spread_collapsed_features_over_more_codes():
    x = collapsed_features()
    used = {}
    for mode in ("running_ratio", "moments"):
        q = make(mode)
        q.train()
        with torch.no_grad():
            used[mode] = q(x).codes.unique().numel()
    assert used["moments"] > 4 * used["running_ratio"], used


def test_frozen_statistics_stay_put_in_training_mode():
    q = make("moments")
    q.train()
    q(collapsed_features())
    before = (q.projection.feature_mean.clone(), q.projection.feature_var.clone())
    q.freeze_norm_stats(True)
    q(collapsed_features() * 3 + 1)
    assert torch.equal(q.projection.feature_mean, before[0]) and torch.equal(q.projection.feature_var, before[1])
    q.freeze_norm_stats(False)
    q(collapsed_features() * 3 + 1)
    assert not torch.equal(q.projection.feature_mean, before[0])
