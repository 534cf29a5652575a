"""Classifier-free guidance in logit space.

After FoundationVision/LlamaGen (`autoregressive/models/generate.py`, `sample`/`decode_one_token`):
the conditional and unconditional rows run as one batch, and the next-token logits are mixed as
`uncond + scale * (cond - uncond)`. We write the same quantity as `cond + (scale - 1) * (cond - uncond)`:
at scale 1 the second term is exactly zero, so guidance at scale 1 returns the conditional logits bit for
bit and sampling matches unguided sampling exactly. The unconditional prompt is the empty prompt the
training data drops to (`MLLMSampleBuilder.text_to_image(..., drop_prompt=True)`).
"""

from __future__ import annotations

import math

from torch import Tensor

from unicode_mllm.errors import UserError


def check_cfg_scale(scale: float) -> float:
    """Raise UserError unless the scale is finite and >= 0 (0 = unconditional, 1 = no guidance)."""
    if not math.isfinite(scale) or scale < 0:
        raise UserError(f"cfg_scale must be a finite number >= 0 (1 = no guidance), got {scale}")
    return float(scale)


def mix_guidance(logits: Tensor, scale: float) -> Tensor:
    """(2b, V) logits, conditional rows first then their unconditional rows -> (b, V) guided logits.

    Mix raw logits, before any -inf mask: -inf - -inf would be NaN.
    """
    if logits.shape[0] % 2:
        raise ValueError(f"guidance needs conditional and unconditional rows in pairs, got {logits.shape[0]} rows")
    cond, uncond = logits.chunk(2, dim=0)  # (b, V) each
    return cond + (scale - 1.0) * (cond - uncond)
