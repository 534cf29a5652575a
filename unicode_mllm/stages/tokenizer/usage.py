"""Codebook usage over a sliding window of steps: unique codes per depth (collapse shows up here)."""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor


class UsageWindow:
    """Keeps the last `window` per-step histograms (d, v) and reports unique codes per depth."""

    def __init__(self, num_codes: int, depth: int, window: int):
        self.num_codes, self.depth = num_codes, depth
        self.hists: deque[Tensor] = deque(maxlen=window)
        self.total = torch.zeros(depth, num_codes, dtype=torch.long)

    def add(self, codes: Tensor) -> None:
        """codes: (..., d) code indices of one step."""
        flat = codes.reshape(-1, self.depth).cpu()
        hist = torch.stack([torch.bincount(flat[:, k], minlength=self.num_codes) for k in range(self.depth)])
        if len(self.hists) == self.hists.maxlen:
            self.total -= self.hists[0]
        self.hists.append(hist)
        self.total += hist

    def state_dict(self) -> dict[str, Tensor]:
        """The window's histograms (n, d, v), oldest first, for a checkpoint (int32: counts per step are small)."""
        if not self.hists:
            return {"hists": torch.zeros(0, self.depth, self.num_codes, dtype=torch.int32)}
        return {"hists": torch.stack(list(self.hists)).to(torch.int32)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        hists = state["hists"]
        if tuple(hists.shape[1:]) != (self.depth, self.num_codes):
            raise ValueError(
                f"usage window of shape {tuple(hists.shape)} does not fit ({self.depth}, {self.num_codes})"
            )
        self.hists.clear()
        self.total.zero_()
        for hist in hists[-self.hists.maxlen :].long():
            self.hists.append(hist)
            self.total += hist

    def unique_per_depth(self) -> list[int]:
        return [int(n) for n in (self.total > 0).sum(dim=1)]

    def fraction_per_depth(self) -> list[float]:
        return [n / self.num_codes for n in self.unique_per_depth()]
