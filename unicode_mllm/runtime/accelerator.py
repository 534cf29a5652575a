"""One `Accelerator` per training stage, also when several stages run in one process."""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from unicode_mllm.errors import UserError

_CPU_FSDP = {"set": False}  # whether stage_accelerator turned FSDP on for a CPU launch in this process
_CLOSE_AT_EXIT = {"registered": False}


def close_process_group() -> None:
    """Destroy this process's process group, if a distributed launch made one (torch asks for it before exit).

    Left to the interpreter's teardown, gloo's threads abort a finished two-process CPU run with SIGABRT
    ("terminate called without an active exception") on about 1 exit in 8 (measured: 2 of 16 runs of
    tests/ddp_tokenizer_worker.py; 0 of 20 with the group destroyed first). No barrier: a rank that failed must
    not keep the others waiting at exit.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def fsdp_requested() -> bool:
    """Whether the launch asks for FSDP (`accelerate launch` with `distributed_type: FSDP` sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def stage_accelerator(stage: str, *, fsdp: bool = False, no_fsdp_reason: str = "", **kwargs: Any) -> Accelerator:
    """`Accelerator(**kwargs)` after clearing the settings an earlier stage of this process left behind.

    accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another mixed
    precision. The demo and the ablation run stages 0-2 in one process, and on a bf16-capable GPU the LM
    stages resolve 'auto' to bf16 while the tokenizer preset trains in fp32, so each stage starts from a
    clean state. The process group (PartialState) of a distributed launch is kept.

    fsdp: the trainer gathers and loads full state dicts through FSDP's collectives (stages 0 and 2); FSDP is then
    used as the accelerate config says (FSDP2 with `fsdp_version: 2`). accelerate 1.16 turns FSDP on only for
    GPU-like devices; on a CPU (gloo) launch that asks for it the plugin is applied here, which is what the
    CPU tests run. Raises UserError (`stage` names the trainer) under DeepSpeed, and under FSDP for a
    trainer that does not support it.
    """
    if _CPU_FSDP["set"]:  # an earlier stage of this process ran FSDP on CPU: the process group is plain gloo again
        PartialState().distributed_type = DistributedType.MULTI_CPU
        _CPU_FSDP["set"] = False
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(**kwargs)
    if not _CLOSE_AT_EXIT["registered"] and dist.is_available() and dist.is_initialized():
        atexit.register(close_process_group)  # atexit runs before the interpreter tears modules down
        _CLOSE_AT_EXIT["registered"] = True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UserError(
            f"{stage}: accelerate is set up for DeepSpeed, whose ZeRO-sharded weights and optimizer state this "
            "trainer's checkpoints do not gather; launch with configs/accelerate/fsdp2.yaml (stage 2), "
            "configs/accelerate/ddp_bf16.yaml or a single process"
        )
    if fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        if fsdp:
            # On the process state too: accelerate copies it into AcceleratorState whenever one is constructed.
            PartialState().distributed_type = DistributedType.FSDP
            _CPU_FSDP["set"] = True
            state = AcceleratorState()
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin()  # its settings from the launch's FSDP_* variables
            if accelerator.mixed_precision != "no":  # as accelerate does for GPUs
                state.fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)
        else:
            accelerator.state.distributed_type = DistributedType.FSDP  # refused just below
    if accelerator.distributed_type == DistributedType.FSDP and not fsdp:
        raise UserError(
            f"{stage}: accelerate is set up for FSDP, which this stage does not run under (only stages 0 and 2, "
            f"train-lm and train-mllm, do){no_fsdp_reason}; launch with configs/accelerate/ddp_bf16.yaml "
            "(or a single process)"
        )
    return accelerator


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP
