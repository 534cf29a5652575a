"""How the visual codebook is pulled onto the language codebook C_L (language-driven iterative training).

Both schedules write `C' = lam * C + (1 - lam) * C_L` through the quantizer's EMA-consistent
`blend_toward`, one way only (C_L never moves):

- `interval` (the paper): every `every` steps, blend with a fixed `lam`.
- `ramp` (after the UniCode reference code): a blend every step whose weight ratio = t / ramp_steps rises
  linearly to 1, so the codebook *equals* C_L at the end of the ramp; the remaining (tail) steps train
  with the codebook fixed. The GAN generator weight is scaled by `1 - 0.9 * ratio`. Blends compound
  (each one acts on the already blended codebook), so writing `lam = 1 - ratio` every step would leave
  a share prod(1 - k/R) ~ exp(-t^2 / 2R) of the visual codebook: C_L after ~sqrt(R) steps, not R. We
  use `lam_t = (R - t) / (R - t + 1)` instead, which makes the visual share fall linearly, 1 - t/R,
  so the codebook keeps following the encoder (EMA) for the whole ramp while it is pulled onto C_L.
- `none`: no blending (the `frozen`, `dual` and `separate` modes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from unicode_mllm.config import bounded
from unicode_mllm.errors import ConfigError
from unicode_mllm.visual_tokenizer.quantizer import StackedQuantizer

ScheduleKind = Literal["interval", "ramp", "none"]


@dataclass
class BlendConfig:
    schedule: ScheduleKind = "ramp"
    every: int = bounded(100, min=1, help="interval: steps between blends")
    lam: float = bounded(0.9, min=0.0, max=1.0, help="interval: weight kept on the visual codebook")
    ramp_steps: int = bounded(1000, min=1, help="ramp: steps over which lam falls from 1 to 0")


class BlendSchedule:
    """Applies the blend after each optimisation step and tells the trainer what the step means."""

    def __init__(self, cfg: BlendConfig):
        self.cfg = cfg

    def ratio(self, step: int) -> float:
        """ramp: fraction of the ramp done after `step` steps (0..1); 0 for the other schedules."""
        if self.cfg.schedule != "ramp":
            return 0.0
        return min(1.0, step / self.cfg.ramp_steps)

    def gan_scale(self, step: int) -> float:
        return 1.0 - 0.9 * self.ratio(step)

    def codebook_fixed(self, step: int) -> bool:
        """ramp: once the codebook equals C_L (tail steps), it is not updated any more."""
        return self.cfg.schedule == "ramp" and step >= self.cfg.ramp_steps

    def lam_after(self, step: int) -> float | None:
        """The blend weight to apply after optimisation step `step` (1-based count), or None."""
        if self.cfg.schedule == "interval":
            return self.cfg.lam if step % self.cfg.every == 0 else None
        if self.cfg.schedule == "ramp":
            remaining = self.cfg.ramp_steps - step
            return None if remaining < 0 else remaining / (remaining + 1)
        return None

    def apply(self, step: int, quantizer: StackedQuantizer, language_codebook: Tensor) -> float | None:
        """Blend after `step` optimisation steps; returns the lam used (None when nothing was done)."""
        lam = self.lam_after(step)
        if lam is not None:
            quantizer.blend_toward(language_codebook, lam)
        return lam


def check_mode_schedule(codebook_mode: str, schedule: str) -> None:
    """Only `language_driven` blends; the other modes must say `none`."""
    if codebook_mode == "language_driven" and schedule == "none":
        raise ConfigError("codebook.mode='language_driven' needs codebook.blend.schedule 'interval' or 'ramp'")
    if codebook_mode != "language_driven" and schedule != "none":
        raise ConfigError(
            f"codebook.mode={codebook_mode!r} never blends toward C_L, so codebook.blend.schedule must be "
            f"'none' (got {schedule!r})"
        )
