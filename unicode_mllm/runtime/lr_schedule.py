"""Learning-rate multipliers shared by every training stage."""

from __future__ import annotations

import math


class WarmupCosine:
    """lr multiplier: linear warm-up over `warmup_steps`, then cosine from 1 to `min_lr_ratio` at `total_steps`.

    A class rather than a lambda so `LambdaLR.state_dict()` saves its settings (as plain JSON).
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # the first step already moves (never lr = 0)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
