"""`train.max_minutes`: when a run stops early, decided once for every rank of a distributed launch.

Each rank reads its own clock, and the clocks of a DDP/FSDP launch drift apart (process start, data loading,
rank 0's checkpoint writes), so a rank-local test could stop one rank a step before another, which then waits
forever in the next collective. `out_of_time` all-reduces the verdict with MAX: any rank past the budget stops
every rank at the same step.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def out_of_time(started: float, max_minutes: float | None, device: torch.device | str = "cpu") -> bool:
    """Whether `max_minutes` (None or 0: no limit) have passed since `started` (a time.perf_counter()) on any rank.

    device: where the launch's collectives run (the accelerator's device: CUDA under NCCL, the CPU under gloo).
    Every rank must call it at the same step when a limit is set.
    """
    if not max_minutes:
        return False
    over = time.perf_counter() - started > 60 * max_minutes
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if over else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        over = bool(flag.item() > 0)
    return over
