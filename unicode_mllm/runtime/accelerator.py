"""One `Accelerator` per training stage, also when several stages run in one process."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState


def stage_accelerator(**kwargs: Any) -> Accelerator:
    """`Accelerator(**kwargs)` after clearing the settings an earlier stage of this process left behind.

    accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another mixed
    precision. The demo and the ablation run stages 0-2 in one process, and on a bf16-capable GPU the LM
    stages resolve 'auto' to bf16 while the tokenizer preset trains in fp32, so each stage starts from a
    clean state. The process group (PartialState) of a distributed launch is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(**kwargs)
