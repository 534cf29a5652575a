"""fp32 `nn.Linear` layers through oneDNN's inner product while decoding on a CPU.

A decode step multiplies a few rows (the batch) by every weight of the LM once. On the CPU PyTorch sends an fp32
`F.linear` to MKL's sgemm, which is slow at this shape: measured on the 2-core EPYC (1 thread) at
configs/lm/small.yaml's shape, batch 8, oneDNN's inner product on a copy of each weight in oneDNN's tensor format
(`Tensor.to_mkldnn`, what `torch.utils.mkldnn.to_mkldnn` does to a module) makes the whole decoding about 1.2x
faster, 1.5x at width 1024 (BENCHMARKS.md); on small layers it is slower, so `auto` switches only layers of at least
MIN_WEIGHT_ELEMENTS weights. bf16 linears already run on oneDNN, so only fp32 ones are switched.

The copies are made when decoding starts (`onednn_linears(lm)`: 55 ms for all 57 layers of the small shape, about
two decode steps) and kept with the LM (a weak reference: they go with it) for the next decodes, as long as no weight
has changed: every weight's version counter and storage are compared at each call, so training between two
decodes repacks, never reads stale copies. `active()` routes the eligible layers through them for one forward and
restores them after; with autograd on it changes nothing (oneDNN's inner product does not backpropagate). The outputs
differ from sgemm's in the last bits (another summation order: at most 2.4e-6 on the small shape's head), so a sampled
token can change only when a draw falls that close to a boundary of the cumulative distribution, a greedy one on a
near-tie; tests/test_onednn_linears.py checks token for token that the tokens are the same.

Eligible: exactly `nn.Linear` (not subclasses such as quantized or LoRA layers, whose forward is their own), fp32,
whole plain CPU weights, no instance-level `forward` (accelerate's offload hooks put one there). The
switch is on only while autograd is off (inference), and only when the copies fit: they take as much memory as the
weights, so `auto` needs them under a quarter of the memory the system reports available.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

LINEAR_KERNELS = ("auto", "onednn", "default")  # `auto`: oneDNN for large eligible layers, when the copies fit
# `auto` leaves smaller weights to sgemm: per call oneDNN converts the input and output (to_mkldnn / to_dense), which
# costs more than it saves on small layers (measured, batch 8: a 512 x 512 layer 63 -> 80 us; LLaMA widths 128 and
# 512 whole: 0.60x, and 1.29x with only the layers of >= 2^19 weights switched vs 1.21x with all; width 1024: 1.49x).
MIN_WEIGHT_ELEMENTS = 2**19
AVAILABLE_MEMORY_SHARE = 4  # `auto` packs only when the copies take under 1/4 of the available memory
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # lm -> (kind, weights' versions, OneDNNLinears)


def _eligible(module: nn.Module) -> bool:
    if type(module) is not nn.Linear:
        return False
    weight = module.weight
    return (
        "forward" not in vars(module)
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.layout == torch.strided
        and type(weight.data) is Tensor  # not a DTensor, a meta or a quantized weight
        and tuple(weight.shape) == (module.out_features, module.in_features)  # not a ZeRO-3 partition
    )


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf on this platform: do not pack under `auto`
        return 0


def _onednn_forward(weight: Tensor, bias: Tensor | None):
    def forward(x: Tensor) -> Tensor:  # x (..., in) fp32 -> (..., out) fp32
        return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), weight, bias).to_dense()

    return forward


class OneDNNLinears:
    """oneDNN copies of an LM's eligible fp32 linear weights, for `active()` to route its forwards through.

    lm: any torch module (a HF causal LM, peft-wrapped or not). kind: "auto" (pack the eligible layers of at least
    MIN_WEIGHT_ELEMENTS weights when the CPU backend has oneDNN and the copies fit), "onednn" (pack every eligible
    layer; ValueError when oneDNN is missing) or "default" (never pack). `enabled` says whether anything was packed.
    """

    def __init__(self, lm: nn.Module, kind: str = "auto"):
        if kind not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernels must be one of {LINEAR_KERNELS}; got {kind!r}")
        if kind == "onednn" and not torch.backends.mkldnn.is_available():
            raise ValueError("linear_kernels='onednn' needs a PyTorch built with oneDNN (mkldnn); use 'auto'")
        self._packed: list[tuple[nn.Module, Any]] = []
        if kind == "default" or not torch.backends.mkldnn.is_available() or torch.is_grad_enabled():
            return
        layers = [m for m in lm.modules() if _eligible(m)]
        if kind == "auto":
            layers = [m for m in layers if m.weight.numel() >= MIN_WEIGHT_ELEMENTS]
        weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
        if kind == "auto" and weight_bytes * AVAILABLE_MEMORY_SHARE > _available_bytes():
            return
        for m in layers:
            bias = None if m.bias is None else m.bias.detach().to_mkldnn()
            self._packed.append((m, _onednn_forward(m.weight.detach().to_mkldnn(), bias)))

    @property
    def enabled(self) -> bool:
        return bool(self._packed)

    @contextmanager
    def active(self) -> Iterator[None]:
        """The packed layers forward through oneDNN inside the block (instance-level `forward`, removed after)."""
        if torch.is_grad_enabled():
            yield
            return
        for module, forward in self._packed:
            module.forward = forward
        try:
            yield
        finally:
            for module, _ in self._packed:
                del module.forward


def _weight_versions(lm: nn.Module) -> tuple[tuple[int, int], ...]:
    return tuple((m.weight._version, m.weight.data_ptr()) for m in lm.modules() if isinstance(m, nn.Linear))


def onednn_linears(lm: nn.Module, kind: str = "auto") -> OneDNNLinears:
    """The LM's packed linears for `kind`, reused from the last call while no weight of it has changed."""
    versions = _weight_versions(lm)
    cached = _PACKED.get(lm)
    if cached is not None and cached[0] == kind and cached[1] == versions:
        return cached[2]
    _PACKED.pop(lm, None)  # free the old copies before making new ones
    packed = OneDNNLinears(lm, kind)
    if packed.enabled:
        _PACKED[lm] = (kind, versions, packed)
    return packed
