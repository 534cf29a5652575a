"""Which stage-2 samples a record yields: the task mixture, drawn per record and replayable.

A weight is the expected number of samples of a task per record: `vqa: 1.0` gives every record one VQA
conversation, `decompression: 0.25` gives a quarter of them a decompression sample, `caption: 2.0` two
captions. The draws (and the classifier-free-guidance prompt drops) come from an RNG keyed by
(seed, epoch, record key), not from a running stream, so resuming mid-epoch reproduces them exactly
and every rank or worker agrees without communication.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from unicode_mllm.data.mllm_samples import TASKS


@dataclass(frozen=True)
class RecordPlan:
    """The samples to build from one record: tasks in order (a task may repeat), and the CFG drops."""

    tasks: tuple[str, ...]
    drop_prompt: tuple[bool, ...]  # one per `text_to_image` entry of `tasks`, in order


class TaskMixture:
    """Draws a `RecordPlan` per record from task weights (expected samples per record)."""

    def __init__(self, weights: Mapping[str, float], *, cfg_drop_rate: float = 0.0, seed: int = 0):
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; choose from {list(TASKS)}")
        bad = {k: v for k, v in weights.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"task weights must be finite and >= 0, got {bad}")
        if sum(weights.values()) <= 0:
            raise ValueError("every task weight is 0; give at least one task a positive weight")
        if not 0.0 <= cfg_drop_rate <= 1.0:
            raise ValueError(f"cfg_drop_rate must lie in [0, 1], got {cfg_drop_rate}")
        self.weights = {task: float(weights.get(task, 0.0)) for task in TASKS}
        self.cfg_drop_rate = cfg_drop_rate
        self.seed = seed

    @property
    def expected_samples_per_record(self) -> float:
        return sum(self.weights.values())

    def plan(self, record_key: str, epoch: int) -> RecordPlan:
        # A string seed is hashed with sha512 by random.Random: stable across processes and runs.
        rng = random.Random(f"mixture-{self.seed}-{epoch}-{record_key}")
        tasks: list[str] = []
        for task in TASKS:  # fixed order, so a plan never depends on dict ordering
            weight = self.weights[task]
            count = int(weight) + (rng.random() < weight - int(weight))
            tasks += [task] * count
        drops = tuple(rng.random() < self.cfg_drop_rate for t in tasks if t == "text_to_image")
        return RecordPlan(tuple(tasks), drops)
