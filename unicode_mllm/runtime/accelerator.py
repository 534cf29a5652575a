"""One `Accelerator` per training stage, also when several stages run in one process."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

from unicode_mllm.errors import UserError

log = logging.getLogger(__name__)

_CPU_SHARDED = {"set": False}  # whether stage_accelerator turned FSDP/DeepSpeed on for a CPU launch in this process
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


def deepspeed_requested() -> bool:
    """Whether the launch asks for DeepSpeed (`accelerate launch` with `distributed_type: DEEPSPEED` sets this)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def stage_accelerator(
    stage: str, *, fsdp: bool = False, deepspeed: bool = False, no_fsdp_reason: str = "", **kwargs: Any
) -> Accelerator:
    """`Accelerator(**kwargs)` after clearing the settings an earlier stage of this process left behind.

    accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another mixed
    precision. The demo and the ablation run stages 0-2 in one process, and on a bf16-capable GPU the LM
    stages resolve 'auto' to bf16 while the tokenizer preset trains in fp32, so each stage starts from a
    clean state. The process group (PartialState) of a distributed launch is kept.

    fsdp / deepspeed: the trainer gathers and loads full state dicts through FSDP's collectives, or ZeRO's
    partitions (runtime/sharded.py; stages 0 and 2); FSDP and DeepSpeed are then used as the accelerate config
    says. accelerate 1.16 turns either on only for GPU-like devices; on a CPU (gloo) launch that asks for one the
    plugin is applied here, which is what the CPU tests run. Raises UserError (`stage` names the trainer, and
    `no_fsdp_reason` says why it runs neither) under FSDP or DeepSpeed for a trainer that does not support it.
    """
    if _CPU_SHARDED["set"]:  # an earlier stage of this process ran FSDP/DeepSpeed on CPU: plain gloo again
        PartialState().distributed_type = DistributedType.MULTI_CPU
        _CPU_SHARDED["set"] = False
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    if deepspeed_requested() and not deepspeed:  # before accelerate sets DeepSpeed up
        raise _unsupported(stage, "DeepSpeed", no_fsdp_reason)
    accelerator = Accelerator(**kwargs)
    if not _CLOSE_AT_EXIT["registered"] and dist.is_available() and dist.is_initialized():
        atexit.register(close_process_group)  # atexit runs before the interpreter tears modules down
        _CLOSE_AT_EXIT["registered"] = True
    cpu_launch = accelerator.distributed_type == DistributedType.MULTI_CPU
    if deepspeed_requested() and accelerator.distributed_type == DistributedType.NO:
        raise UserError(
            f"{stage}: DeepSpeed on CPU needs a launch of 2 or more processes (num_processes in its config)"
        )
    if deepspeed_requested() and cpu_launch:
        _cpu_deepspeed(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and not deepspeed:
        raise _unsupported(stage, "DeepSpeed", no_fsdp_reason)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _build_models_whole(accelerator, stage)
    if fsdp_requested() and cpu_launch:
        if fsdp:
            # On the process state too: accelerate copies it into AcceleratorState whenever one is constructed.
            PartialState().distributed_type = DistributedType.FSDP
            _CPU_SHARDED["set"] = True
            state = AcceleratorState()
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin()  # its settings from the launch's FSDP_* variables
            if accelerator.mixed_precision != "no":  # as accelerate does for GPUs
                state.fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)
        else:
            accelerator.state.distributed_type = DistributedType.FSDP  # refused just below
    if accelerator.distributed_type == DistributedType.FSDP and not fsdp:
        raise _unsupported(stage, "FSDP", no_fsdp_reason)
    return accelerator


def _unsupported(stage: str, strategy: str, reason: str) -> UserError:
    return UserError(
        f"{stage}: accelerate is set up for {strategy}, which this stage does not run under (only stages 0 and 2, "
        f"train-lm and train-mllm, do){reason}; launch with configs/accelerate/ddp_bf16.yaml (or a single process)"
    )


def _cpu_deepspeed(accelerator: Accelerator) -> None:
    """What accelerate does for a GPU launch of DeepSpeed, on a CPU (gloo) one: DeepSpeed's communication over
    the existing process group, and the plugin from the launch's ACCELERATE_DEEPSPEED_* variables."""
    try:
        from deepspeed import comm
    except ImportError:
        raise UserError(
            "accelerate is set up for DeepSpeed, which is not installed; pip install 'unicode-mllm[deepspeed]'"
        ) from None
    # Its shared-memory op serves inference all-reduces on CPU only, and building it JIT-compiles C++ (a compiler
    # and about a minute on first use) for nothing a gloo training run calls. (By name: `deepspeed.comm.torch` as an
    # attribute is the torch package that deepspeed.comm imports.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    precision = accelerator.mixed_precision  # read before the switch: under DeepSpeed it comes from the plugin
    comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # wraps the gloo group accelerate made
    PartialState().distributed_type = DistributedType.DEEPSPEED
    _CPU_SHARDED["set"] = True
    state = AcceleratorState()
    state.distributed_type = DistributedType.DEEPSPEED
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(precision)
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin


def _build_models_whole(accelerator: Accelerator, stage: str) -> None:
    """Under ZeRO-3 transformers loads models partitioned (deepspeed.zero.Init) while accelerate's DeepSpeed config
    is registered with it. The trainers build theirs whole (the model code reads and resizes the embedding table,
    and `save_final` rebuilds one on the main process only) and `prepare` partitions them: the registration goes."""
    from transformers.integrations import unset_hf_deepspeed_config

    if accelerator.state.deepspeed_plugin.zero3_init_flag:
        log.warning(
            "%s: zero3_init_flag is not used: each process builds the whole model, then ZeRO-3 partitions it", stage
        )
    unset_hf_deepspeed_config()


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(accelerator: Accelerator, *, stage: str, grad_clip: float | None) -> None:
    """Before `prepare` under DeepSpeed: the trainer's settings in the engine's config, which owns the step.

    The engine clips gradients itself (`gradient_clipping`, 0 = off), so the trainer's clip goes there; a config
    that names another value is refused. The trainers accumulate their own passes per optimizer step (a step's
    number of forward passes varies with the samples' lengths) and mark the last one (`accumulation`), so the
    engine's own accumulation must be 1. The micro-batch size only feeds DeepSpeed's throughput logs. fp16 is
    refused: its dynamic loss scale would restart on resume.
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    stage_of_zero = int(config.get("zero_optimization", {}).get("stage", 0))
    if stage_of_zero not in (1, 2, 3):
        raise UserError(
            f"{stage}: DeepSpeed runs here with ZeRO stage 1, 2 or 3, the config has {stage_of_zero}; set zero_stage"
        )
    if accelerator.mixed_precision == "fp16":
        raise UserError(f"{stage}: under DeepSpeed use bf16 or fp32 (fp16's loss scale is not in the checkpoints)")
    clip = float(grad_clip) if grad_clip is not None and 0 < grad_clip < float("inf") else 0.0
    given = config.get("gradient_clipping", "auto")
    if given not in ("auto", None) and float(given) != clip:
        raise UserError(
            f"{stage}: the DeepSpeed config clips gradients at {given}, the training config at {clip or 'none'}; "
            "leave gradient_clipping out of the DeepSpeed config and set optim.grad_clip"
        )
    config["gradient_clipping"] = clip
    accumulation = config.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", None, 1) or accelerator.gradient_accumulation_steps != 1:
        raise UserError(
            f"{stage}: the DeepSpeed config accumulates {accumulation} steps; set gradient_accumulation_steps to 1 "
            "(or auto) there and the accumulation in the training config"
        )
    config["gradient_accumulation_steps"] = 1
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = 1
    config.pop("train_batch_size", None)  # DeepSpeed derives it: micro-batch x accumulation x processes
    if stage_of_zero == 3:  # the final model is exported whole (`get_state_dict` gathers it one module at a time)
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True


@contextlib.contextmanager
def accumulation(accelerator: Accelerator, model: Any, last: bool) -> Iterator[None]:
    """Around the backward of one of an optimizer step's passes: gradients are synchronised on the `last` one.

    DDP skips its all-reduce on the others (`no_sync`); FSDP2 its reduce-scatter. Under DeepSpeed accelerate's
    `backward` marks the engine's accumulation boundary from `sync_gradients` and steps the engine on it (the
    engine then steps the optimizer, clips and zeroes the gradients: `optimizer.step()` is a no-op there).
    """
    if last:
        yield
    elif is_deepspeed(accelerator):
        accelerator.gradient_state._set_sync_gradients(False)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
    else:
        with accelerator.no_sync(model):
            yield
