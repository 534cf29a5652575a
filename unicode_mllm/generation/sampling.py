"""Choosing the next token from logits: greedy, or temperature + top-k + top-p sampling with per-row seeds.

Every generated row (one image, one answer) owns a seed, derived from the request's seed and the row's
index in the request, and all of its random draws come from that seed alone. A row therefore gets the
same tokens whether it is decoded alone or batched with others, in any batch size, and the classifier-
free guidance rows (which consume no draws) change nothing. Sampling is inverse-CDF on one uniform draw
per row and step: `u ~ U[0, 1)` picks the first token whose cumulative probability exceeds `u`.

Filtering after the common recipe (HF `TopKLogitsWarper` / `TopPLogitsWarper`, LlamaGen's
`top_k_top_p_filtering`): temperature first, then top-k, then top-p on what remains.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from unicode_mllm.errors import UserError


@dataclass(frozen=True)
class SamplingSettings:
    """temperature 0 is greedy (argmax; top_k and top_p then do nothing); top_k None or 0 and top_p None
    or 1.0 switch those filters off. depth_temperatures (image spans only): one temperature per code depth
    of a position, replacing `temperature` there (e.g. sample the `hq` top code at 1.0 and its four bottom
    codes at 0.5). Raises UserError for values out of range."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    depth_temperatures: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):  # NaN and inf too
            raise UserError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k must be >= 1 (or 0/None for no top-k filter), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must lie in (0, 1] (1 = no top-p filter), got {self.top_p}")
        if self.depth_temperatures is not None:
            temps = tuple(float(t) for t in self.depth_temperatures)
            if not temps or not all(math.isfinite(t) and t >= 0.0 for t in temps):
                raise UserError(f"depth temperatures must be one or more values >= 0 and finite, got {list(temps)}")
            object.__setattr__(self, "depth_temperatures", temps)

    @property
    def is_greedy(self) -> bool:
        """No draw is ever needed (every temperature in use is 0)."""
        if self.depth_temperatures is not None:
            return all(t == 0.0 for t in self.depth_temperatures)
        return self.temperature == 0.0

    def request_seed(self, seed: int | None) -> int | None:
        """The request's seed (`resolve_seed(seed)`), or None when greedy: nothing is drawn then."""
        return None if self.is_greedy else resolve_seed(seed)

    def at_depth(self, depth: int) -> SamplingSettings:
        """The settings for a code at `depth` of its position (itself without depth temperatures)."""
        if self.depth_temperatures is None:
            return self
        return SamplingSettings(self.depth_temperatures[depth], self.top_k, self.top_p)


def resolve_seed(seed: int | None) -> int:
    """The request's seed: `seed` itself, or a fresh one from the OS when None (report it to reproduce)."""
    if seed is None:
        return random.SystemRandom().randrange(2**31)
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    return int(seed)


def row_seed(seed: int, index: int) -> int:
    """The seed of row `index` of a request seeded with `seed`.

    numpy's SeedSequence hashes the pair, so (seed, index + 1) and (seed + 1, index) give unrelated
    streams; `seed + index` would hand image 1 of seed 0 the draws of image 0 of seed 1.
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def row_seeds(request_seed: int | None, indices: Iterable[int]) -> list[int] | None:
    """`row_seed` of each row index, or None for a greedy request (no seed)."""
    return None if request_seed is None else [row_seed(request_seed, i) for i in indices]


def uniform_draws(seeds: Sequence[int], num_steps: int) -> Tensor:
    """(b, num_steps) float64 uniforms in [0, 1), row r drawn from its own generator seeded with seeds[r].

    Drawn once on the CPU for the whole decode, so they do not depend on the device or on the batch.
    """
    rows = [torch.rand(num_steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
    return torch.stack(rows) if rows else torch.zeros(0, num_steps, dtype=torch.float64)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """(b, V) logits -> (b, V) with -inf outside the top-k and outside the top-p nucleus.

    The most likely token always survives. Entries already at -inf (a constraint's ban) stay there and
    never count towards top-p's mass.
    """
    if top_k:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass *before* it already reaches top_p: the kept set is the smallest
        # prefix whose mass is >= top_p, and it always holds the first token.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_probs(probs: Tensor, uniforms: Tensor) -> Tensor:
    """(b, V) probabilities (rows sum to ~1) and (b,) uniforms in [0, 1) -> (b,) int64 token ids.

    Inverse CDF: the first token whose cumulative probability exceeds u * total. A token of probability
    0 is never returned, even when rounding puts u * total at or past the last cumulative value.
    """
    # fp64 cumulative sums (fp32 drifts over a 32K-token vocabulary), except on MPS, which has no fp64.
    probs = probs.float() if probs.device.type == "mps" else probs.double()
    cdf = probs.cumsum(dim=-1)  # (b, V)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]  # (b, 1); uniforms may live on the CPU
    ids = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]  # (b,)
    last_nonzero = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(probs.dtype).argmax(dim=-1)  # (b,)
    ok = probs.gather(-1, ids[:, None])[:, 0] > 0
    return torch.where(ok, ids, last_nonzero)


def choose_next_tokens(logits: Tensor, settings: SamplingSettings, uniforms: Tensor | None) -> Tensor:
    """(b, V) fp32 logits (constraints already applied as -inf) -> (b,) int64 token ids.

    uniforms: (b,) draws in [0, 1) for the rows (unused, and may be None, when greedy).
    Raises ValueError when a row has no allowed token (every logit -inf or NaN).
    """
    finite = torch.isfinite(logits)
    if not bool(finite.any(dim=-1).all()):
        row = int((~finite.any(dim=-1)).nonzero()[0, 0])
        raise ValueError(f"row {row} has no allowed next token (all logits are -inf or NaN)")
    if settings.is_greedy:
        return logits.argmax(dim=-1)
    if uniforms is None:
        raise ValueError("sampling needs one uniform draw per row; got None")
    scaled = filter_logits(logits.float() / settings.temperature, settings.top_k, settings.top_p)
    return sample_from_probs(scaled.softmax(dim=-1), uniforms)
