"""Codebook usage over a whole evaluation set: distinct codes and perplexity per depth."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class CodeUsage:
    """Accumulates a (d, v) histogram of codes and reports, per depth, how many codes were used and
    the perplexity exp(H) of the code distribution (H in nats; perplexity = v when all v codes are
    used equally often, 1 when one code is used everywhere).

    Unlike `unicode_mllm.stages.tokenizer.usage.UsageWindow` (a sliding window of training steps), this keeps one
    running total, so its memory does not grow with the number of batches.
    """

    def __init__(self, num_codes: int, depth: int):
        if num_codes < 1 or depth < 1:
            raise ValueError(f"num_codes and depth must be >= 1, got num_codes={num_codes}, depth={depth}")
        self.num_codes, self.depth = num_codes, depth
        self.counts = torch.zeros(depth, num_codes, dtype=torch.long)

    def add(self, codes: Tensor) -> None:
        """codes: (..., d) int code indices in [0, num_codes). Raises ValueError otherwise."""
        if codes.shape[-1] != self.depth:
            raise ValueError(f"codes {tuple(codes.shape)} have depth {codes.shape[-1]} (last axis), not {self.depth}")
        flat = codes.reshape(-1, self.depth).cpu().long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_codes):
            raise ValueError(f"codes must lie in [0, {self.num_codes}); got [{int(flat.min())}, {int(flat.max())}]")
        for k in range(self.depth):
            self.counts[k] += torch.bincount(flat[:, k], minlength=self.num_codes)

    @property
    def num_positions(self) -> int:
        """How many code positions (per depth) were added."""
        return int(self.counts[0].sum())

    def distinct_per_depth(self) -> list[int]:
        return [int(n) for n in (self.counts > 0).sum(dim=1)]

    def distinct_any_depth(self) -> int:
        """Codes used at least once at any depth (the depths share one codebook)."""
        return int((self.counts.sum(dim=0) > 0).sum())

    def perplexity_per_depth(self) -> list[float]:
        out = []
        for row in self.counts.double():
            total = row.sum()
            if total == 0:
                out.append(0.0)  # nothing seen: no distribution to measure
                continue
            p = row[row > 0] / total
            out.append(float(torch.exp(-(p * p.log()).sum())))
        return out

    def to_dict(self) -> dict[str, Any]:
        distinct = self.distinct_per_depth()
        return {
            "num_codes": self.num_codes,
            "num_positions": self.num_positions,
            "distinct_any_depth": self.distinct_any_depth(),
            "per_depth": [
                {"depth": k, "distinct": n, "fraction": n / self.num_codes, "perplexity": p}
                for k, (n, p) in enumerate(zip(distinct, self.perplexity_per_depth(), strict=True))
            ],
        }
