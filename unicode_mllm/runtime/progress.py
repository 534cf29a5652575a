"""Logging set-up and the rich progress bar used for every long loop."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)
log = logging.getLogger("unicode_mllm.progress")

# Off a terminal a progress line is logged at most this often (and at each task's end); the environment variable
# UNICODE_MLLM_PROGRESS_SECONDS overrides it (0: a line at every update).
PLAIN_PROGRESS_SECONDS = 30.0


def setup_logging(level: str | int = "INFO") -> None:
    """Route the library's `logging` to stderr (idempotent): through rich on a terminal, and as plain unwrapped
    lines elsewhere (CI, log files), where rich would wrap every message at 80 columns into several lines."""
    root = logging.getLogger()
    if not any(getattr(h, "_unicode_mllm", False) for h in root.handlers):
        root.addHandler(_log_handler(console.is_terminal))
    root.setLevel(level)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (as rich's console does), not the stream of the
    moment the handler was made: a redirected or captured stderr then still gets the lines."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the property ignores it
        pass


def _log_handler(terminal: bool) -> logging.Handler:
    if terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    else:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    handler._unicode_mllm = True  # type: ignore[attr-defined]  # marks ours, so a second call adds none
    return handler


class _LoggedProgress(Progress):
    """Off a terminal rich draws nothing until the end, so a log file showed nothing during a long stage: this
    Progress also logs one plain line per task every `every` seconds (first update included), when a task reaches
    its total, and for an unfinished task when the progress stops (an interrupted or failed stage)."""

    def __init__(self, *columns, every: float, **kwargs) -> None:
        super().__init__(*columns, **kwargs)
        self._every = every
        self._last_line: dict[int, float] = {}
        self._finished_logged: set[int] = set()

    def update(self, task_id, **kwargs) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._maybe_log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_log(task_id)

    def stop(self) -> None:
        for task in self.tasks:
            if task.id not in self._finished_logged and task.id in self._last_line:
                self._log_line(task.id, ended=True)
        super().stop()

    def _maybe_log(self, task_id) -> None:
        task = self._tasks[task_id]
        if task_id in self._finished_logged:
            return
        now = time.monotonic()
        done = task.total is not None and task.completed >= task.total
        last = self._last_line.get(task_id)
        if done or last is None or now - last >= self._every:
            self._log_line(task_id, ended=done)

    def _log_line(self, task_id, ended: bool) -> None:
        self._last_line[task_id] = time.monotonic()
        task = self._tasks[task_id]
        if ended:
            self._finished_logged.add(task_id)
        log.info(plain_progress_line(task, ended))


def plain_progress_line(task: Any, ended: bool = False) -> str:
    """'stage 0: LM 120/1500 (8%) elapsed 0:01:02 left 0:11:30 loss 3.214 lr 1.0e-03' for a rich Task."""
    done, total = int(task.completed), task.total
    parts = [str(task.description)]
    if total:
        parts.append(f"{done}/{int(total)} ({100 * done / total:.0f}%)")
    else:
        parts.append(str(done))
    elapsed = task.finished_time if task.finished_time is not None else task.elapsed
    if elapsed is not None:
        parts.append(f"elapsed {_clock(elapsed)}")
    if not ended and task.time_remaining is not None:
        parts.append(f"left {_clock(task.time_remaining)}")
    if ended:
        parts.append("done" if total is not None and done >= total else "stopped")
    stats = task.fields.get("stats")
    if stats:
        parts.append(str(stats))
    return " ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _plain_every() -> float:
    try:
        return max(0.0, float(os.environ.get("UNICODE_MLLM_PROGRESS_SECONDS", PLAIN_PROGRESS_SECONDS)))
    except ValueError:
        return PLAIN_PROGRESS_SECONDS


def make_progress(*, transient: bool = False, disable: bool = False) -> Progress:
    """A Progress with description, bar, count, elapsed/remaining time and a free-form `stats` field.

    Off a terminal (CI, log files) rich draws nothing until the end; there the progress logs a plain line every
    `PLAIN_PROGRESS_SECONDS` and at each task's end instead (`_LoggedProgress`). `disable` (other ranks) logs none.
    """
    if not disable and not console.is_terminal:
        return _LoggedProgress(*_columns(), every=_plain_every(), console=console, transient=transient)
    return Progress(*_columns(), console=console, transient=transient, disable=disable)


def _columns() -> tuple[Any, ...]:
    return (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
    )


def track(items: Iterable[T], description: str, total: int | None = None, disable: bool = False) -> Iterator[T]:
    """Iterate with a progress bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress(disable=disable) as progress:
        task = progress.add_task(description, total=total, stats="")
        for item in items:
            yield item
            progress.advance(task)
