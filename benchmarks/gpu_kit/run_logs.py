"""Steps per second and the final training loss, read from the log rows the three trainers write.

stage 0 (`train_lm`):         <run>/log.jsonl,     time `elapsed_s`,     loss `train/loss` (rows with `val/loss`
                                                    also hold the held-out evaluation's time, so they are skipped);
stage 1 (`train_tokenizer`):  <run>/metrics.jsonl, time `seconds`,       loss `total`;
stage 2 (`train_mllm`):       <run>/metrics.jsonl, time `train_seconds` (optimizer steps only), loss `loss`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

STAGE_LOGS = {  # stage -> (file, time key, loss key, key of rows whose time includes an evaluation)
    "stage0": ("log.jsonl", "elapsed_s", "train/loss", "val/loss"),
    "stage1": ("metrics.jsonl", "seconds", "total", None),
    "stage2": ("metrics.jsonl", "train_seconds", "loss", None),
}


@dataclass(frozen=True)
class StageProgress:
    steps: int  # the last logged step
    steps_per_s: float  # between the first and the last timed rows: the steps before the first (warm-up) excluded
    timed_steps: int
    final_loss: float


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_progress(stage: str, run_dir: Path) -> StageProgress:
    """Raises ValueError when the log has fewer than two timed rows (log more often, or run more steps)."""
    name, time_key, loss_key, skip_key = STAGE_LOGS[stage]
    rows = [r for r in read_rows(Path(run_dir) / name) if loss_key in r]
    timed = [r for r in rows if time_key in r and (skip_key is None or skip_key not in r)]
    if len(timed) < 2 or not rows:
        raise ValueError(f"{stage}: {len(timed)} timed log rows in {run_dir / name}; need two (log more often)")
    first, last = timed[0], timed[-1]
    steps = last["step"] - first["step"]
    seconds = last[time_key] - first[time_key]
    return StageProgress(
        steps=rows[-1]["step"],
        steps_per_s=steps / seconds if seconds > 0 else float("inf"),
        timed_steps=steps,
        final_loss=float(rows[-1][loss_key]),
    )
