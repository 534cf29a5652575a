"""Full tensors out of FSDP2's sharded ones and back, for checkpoints that look the same whoever wrote them.

Under FSDP2 (`fully_shard`) each parameter, and the AdamW moments that follow it, is a DTensor of which a rank
holds one slice. `gather_*` run on every rank in the same order (each `full_tensor()` is one all-gather) and
return the full tensors on CPU on the main process (None/{} elsewhere); `load_full_optimizer_state` gives each
rank its slice of full tensors every rank read from the same checkpoint. Plain tensors pass through, so the same
calls serve one process and DDP.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def full_tensor(value: torch.Tensor, main: bool) -> torch.Tensor | None:
    """The whole of `value` on CPU on the main process (a copy; a collective for a DTensor), None elsewhere."""
    value = value.detach()
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.cpu().clone() if main else None


def gather_tensors(named: Iterable[tuple[str, torch.Tensor]], main: bool) -> dict[str, torch.Tensor]:
    """{name: full tensor} on the main process, {} elsewhere (every rank iterates the same names)."""
    out = {name: full_tensor(t, main) for name, t in named}
    return out if main else {}


def gather_optimizer_state(optimizer: torch.optim.Optimizer, main: bool) -> dict[str, Any]:
    """`optimizer.state_dict()` with full tensors (parameter ids as torch keys them) on the main process."""
    local = optimizer.state_dict()
    state = {
        i: {k: full_tensor(v, main) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        for i, entry in sorted(local["state"].items())
    }
    return {"state": state, "param_groups": local["param_groups"]} if main else {}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's slice of `full`, cut as the DTensor `like` is cut (no communication); `full` itself when
    `like` is a plain tensor."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """`optimizer.load_state_dict` of a full state (as `gather_optimizer_state` or a DDP run saved it): each
    moment shaped like its parameter becomes this rank's slice of it."""
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, entry in state_dict["state"].items():
        p = ordered[int(i)]
        state[i] = {
            k: shard_like(v, p) if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape) else v
            for k, v in entry.items()
        }
    optimizer.load_state_dict({**state_dict, "state": state})
