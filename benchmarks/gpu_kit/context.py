"""What a section gets (its settings, a scratch folder, the device, a deadline) and what it records.

The record is written to `<section dir>/section.json` after every figure, so a section killed at its time cap
still hands back what it measured before.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RECORD_NAME = "section.json"


def one_line(error: BaseException) -> str:
    """'OutOfMemoryError: CUDA out of memory. Tried to allocate ...' (first line, at most 300 characters)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class SectionContext:
    name: str
    mode: str  # "gpu" or "cpu-smoke"
    settings: dict[str, Any]  # the plan's settings of this mode (plan.py)
    out_dir: Path  # scratch: runs, data, checkpoints
    device: torch.device
    deadline: float  # time.monotonic() by which the section should be done (its process is killed later)
    record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.record = {
            "name": self.name,
            "status": "running",
            "settings": dict(self.settings),
            "figures": [],
            "notes": [],
        }
        self.save()

    @property
    def smoke(self) -> bool:
        return self.mode == "cpu-smoke"

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def setting(self, **values: Any) -> None:
        """Settings resolved while running (model sizes, the batch that fit): recorded next to the plan's."""
        self.record["settings"].update(values)
        self.save()

    def figure(self, name: str, value: float, unit: str, **settings: Any) -> None:
        """One measured number with its unit and the settings it was measured at. A non-finite value is kept
        as text ("nan", "inf") so the JSON stays valid and the check in tests/test_gpu_suite.py fails on it."""
        number = float(value)
        entry: dict[str, Any] = {"name": name, "value": number if math.isfinite(number) else str(number), "unit": unit}
        if settings:
            entry["settings"] = settings
        self.record["figures"].append(entry)
        self.save()

    def note(self, text: str) -> None:
        self.record["notes"].append(text)
        self.save()

    def finish(self, status: str, error: str | None = None) -> None:
        self.record["status"] = status
        if error is not None:
            self.record["error"] = error
        self.save()

    def save(self) -> None:
        path = self.out_dir / RECORD_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2, default=str) + "\n")
        tmp.replace(path)


def read_record(section_dir: Path) -> dict[str, Any] | None:
    path = section_dir / RECORD_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated since the last reset (tensors only; None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
