"""Full tensors out of FSDP2's and DeepSpeed ZeRO's sharded ones and back, for checkpoints that look the same
whoever wrote them.

Under FSDP2 (`fully_shard`) each parameter, and the AdamW moments that follow it, is a DTensor of which a rank
holds one slice. `gather_*` run on every rank in the same order (each `full_tensor()` is one all-gather) and
return the full tensors on CPU on the main process (None/{} elsewhere); `load_full_optimizer_state` gives each
rank its slice of full tensors every rank read from the same checkpoint. Plain tensors pass through, so the same
calls serve one process and DDP.

Under DeepSpeed ZeRO a parameter's fp32 master copy lives in this rank's flat partition of the engine's optimizer
(ZeRO-3 partitions the parameter itself too): `full_tensor` gathers the fp32 master of a trained parameter
(DeepSpeed's `safe_get_full_fp32_param`, a collective), so weights in checkpoints are fp32 whatever precision the
engine computes in. The AdamW moments stay sharded as the engine cut them (`zero_partition_state`): each rank
saves and loads its own partitions, which a resume needs the same launch (processes, ZeRO stage) to read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from unicode_mllm.errors import UserError


def full_tensor(value: torch.Tensor, main: bool) -> torch.Tensor | None:
    """The whole of `value` on CPU on the main process (a copy; a collective for a DTensor or a DeepSpeed ZeRO
    parameter), None elsewhere."""
    if is_zero_parameter(value):
        value = _zero_full(value)
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


# ----- DeepSpeed ZeRO -----------------------------------------------------------------------------------


def is_zero_parameter(value: torch.Tensor) -> bool:
    """Whether `value` is a parameter that a DeepSpeed ZeRO engine manages (ZeRO-3's `ds_id`, 1-2's `_hp_mapping`,
    None on the ranks whose partition holds none of it: every rank must still take part in its gather)."""
    return hasattr(value, "ds_id") or hasattr(value, "_hp_mapping")


def _zero_full(param: torch.Tensor) -> torch.Tensor:
    """A ZeRO parameter's whole value, on every rank (a collective): the fp32 master of a trained one, the
    gathered (ZeRO-3) or local (1-2) weights of a frozen one."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    if param.requires_grad:
        full = safe_get_full_fp32_param(param)
        if full is not None:
            return full
    if hasattr(param, "ds_id"):
        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param.detach()


def zero_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The full shape of a parameter (ZeRO-3 leaves an empty tensor in its place and keeps it in `ds_shape`)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def load_full_parameters(parameters: dict[str, torch.nn.Parameter], full: dict[str, torch.Tensor]) -> None:
    """On every rank (each read the same full tensors): each named parameter takes its full tensor; a ZeRO-3
    partitioned one through a gather whose release re-partitions the new values (a collective per parameter)."""
    import deepspeed

    with torch.no_grad():
        for name, tensor in full.items():
            param = parameters[name]
            if hasattr(param, "ds_id"):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.copy_(tensor.to(param.device, param.dtype))
            else:
                param.copy_(tensor.to(param.device, param.dtype))


def _zero_partitions(zero_optimizer: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, one per parameter (sub)group: the keys of the base optimizer's state."""
    for attribute in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
        partitions = getattr(zero_optimizer, attribute, None)
        if partitions is not None:
            return list(partitions)
    raise TypeError(f"{type(zero_optimizer).__name__} is not a DeepSpeed ZeRO optimizer")


def zero_partition_state(zero_optimizer: Any) -> dict[str, Any]:
    """This rank's part of the optimizer as the engine cut it: per flat partition the fp32 master weights and
    the base optimizer's state (AdamW's step and moments), and its groups' settings (the learning rate the
    schedule set last: the scheduler's own state does not restore it). Nested tensors, for `split_tensors`."""
    base = zero_optimizer.optimizer
    return {
        "partitions": [
            {"master": flat.detach(), "state": dict(base.state.get(flat, {}))}
            for flat in _zero_partitions(zero_optimizer)
        ],
        "param_groups": [{k: v for k, v in group.items() if k != "params"} for group in base.param_groups],
    }


def load_zero_partition_state(zero_optimizer: Any, state: dict[str, Any]) -> None:
    """`zero_partition_state` back into this rank's partitions (the same launch wrote it: same shapes)."""
    base = zero_optimizer.optimizer
    partitions = _zero_partitions(zero_optimizer)
    if len(partitions) != len(state["partitions"]):
        raise ValueError(f"{len(state['partitions'])} saved ZeRO partitions for {len(partitions)}")
    with torch.no_grad():
        for flat, saved in zip(partitions, state["partitions"], strict=True):
            flat.copy_(saved["master"])
            base.state[flat] = {
                key: value.to(flat.device) if isinstance(value, torch.Tensor) and value.ndim else value
                for key, value in saved["state"].items()
            }
    for group, settings in zip(base.param_groups, state["param_groups"], strict=True):
        group.update(settings)


def zero_launch(accelerator: Any) -> dict[str, int]:
    """What a ZeRO checkpoint's partitions depend on: the number of processes and the ZeRO stage."""
    return {"processes": accelerator.num_processes, "stage": int(accelerator.state.deepspeed_plugin.zero_stage)}


def check_zero_launch(saved: Any, accelerator: Any, where: Any) -> None:
    """UserError unless the checkpoint at `where` holds ZeRO partitions this launch can read (`zero_launch`)."""
    launch = zero_launch(accelerator)
    if saved == launch:
        return
    if not isinstance(saved, dict):
        raise UserError(
            f"{where} was not written under DeepSpeed (its optimizer state is whole); resume it with the launch "
            "that wrote it (DDP, FSDP or one process)"
        )
    raise UserError(
        f"{where} holds ZeRO-{saved.get('stage')} partitions of {saved.get('processes')} processes, this launch runs "
        f"ZeRO-{launch['stage']} on {launch['processes']}; resume with the accelerate config that wrote it"
    )
