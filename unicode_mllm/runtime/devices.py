"""Device and dtype selection (cuda / mps / cpu) with one-line errors for impossible requests."""

from __future__ import annotations

from typing import Literal

import torch

from unicode_mllm.errors import UserError

DeviceChoice = Literal["auto", "cpu", "cuda", "mps"]
DtypeChoice = Literal["auto", "fp32", "bf16", "fp16"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def select_device(choice: str | torch.device = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu. An unavailable explicit choice raises UserError; a torch.device
    is returned as it is."""
    if isinstance(choice, torch.device):
        return choice
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was requested but CUDA is not available here; use device=auto or cpu")
    if choice == "mps" and not _mps_available():
        raise UserError("device 'mps' was requested but MPS is not available here; use device=auto or cpu")
    if choice not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {choice!r} is unknown; choose one of auto, cpu, cuda, mps")
    return torch.device(choice)


def select_dtype(choice: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU that supports it, else fp32. fp16/bf16 on CPU is refused for fp16 only."""
    if choice == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):  # emulated is slow
            return torch.bfloat16
        return torch.float32
    if choice not in _DTYPES:
        raise UserError(f"dtype {choice!r} is unknown; choose one of auto, {', '.join(_DTYPES)}")
    if choice == "fp16" and device.type == "cpu":
        raise UserError("dtype 'fp16' is not supported on CPU; use fp32 or bf16")
    return _DTYPES[choice]


def mixed_precision_name(dtype: torch.dtype) -> str:
    """The accelerate `mixed_precision` string for a compute dtype."""
    return {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def accelerate_precision(choice: str, device: torch.device) -> str:
    """A config's `mixed_precision` ('no', 'auto', 'bf16', 'fp16') -> accelerate's name for `device`.

    'auto' is bf16 on a GPU with native bf16, else 'no'; fp16 on a CPU raises UserError.
    """
    if choice == "no":
        return "no"
    return mixed_precision_name(select_dtype(choice, device))
