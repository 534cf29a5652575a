"""One `Accelerator` per training stage, also when several stages run in one process."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType

from unicode_mllm.errors import UserError

# Sharded strategies: each rank holds a slice of the parameters and optimizer state. The trainers save
# checkpoints and the final model from the main process's full tensors, which these strategies do not have.
SHARDED = (DistributedType.DEEPSPEED, DistributedType.FSDP)


def stage_accelerator(stage: str, **kwargs: Any) -> Accelerator:
    """`Accelerator(**kwargs)` after clearing the settings an earlier stage of this process left behind.

    accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another mixed
    precision. The demo and the ablation run stages 0-2 in one process, and on a bf16-capable GPU the LM
    stages resolve 'auto' to bf16 while the tokenizer preset trains in fp32, so each stage starts from a
    clean state. The process group (PartialState) of a distributed launch is kept.

    Raises UserError under DeepSpeed or FSDP (`stage` names the trainer in the message): single process and
    DDP are what the checkpoints support.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(**kwargs)
    if accelerator.distributed_type in SHARDED:
        raise UserError(
            f"{stage}: accelerate is set up for {accelerator.distributed_type.value}, whose sharded weights and "
            "optimizer state this trainer's checkpoints do not gather; launch with "
            "configs/accelerate/ddp_bf16.yaml (or a single process)"
        )
    return accelerator
