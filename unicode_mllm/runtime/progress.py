"""Logging set-up and the rich progress bar used for every long loop."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

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


def make_progress(*, transient: bool = False, disable: bool = False) -> Progress:
    """A Progress with description, bar, count, elapsed/remaining time and a free-form `stats` field.

    Off a terminal (CI, logs) rich draws nothing until the end, so bars cost nothing there.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        transient=transient,
        disable=disable,
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
