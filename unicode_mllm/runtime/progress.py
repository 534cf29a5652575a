"""Logging set-up and the rich progress bar used for every long loop."""

from __future__ import annotations

import logging
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
    """Route the library's `logging` through rich on stderr (idempotent)."""
    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False))
    root.setLevel(level)


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
