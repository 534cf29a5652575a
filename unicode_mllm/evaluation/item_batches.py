"""The evaluation loop over a stream of items: batches of `batch_size`, at most `limit` items, a progress bar."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import TypeVar

from unicode_mllm.runtime.progress import make_progress

T = TypeVar("T")


def run_in_batches(
    items: Iterable[T], run: Callable[[list[T]], None], *, batch_size: int, limit: int | None, description: str
) -> None:
    """Call `run(batch)` on consecutive batches of `batch_size` items (the last may be shorter), stopping after
    `limit` items (None: all).

    The stream is closed (when it has `close`, as a generator does) before the last, partial batch runs, also
    after an early stop or an error: a shard reader adds its skip counts when it closes.
    """
    batch: list[T] = []
    stream = iter(items)
    limited = stream if limit is None else itertools.islice(stream, limit)
    with make_progress() as progress:
        task = progress.add_task(description, total=limit, stats="")  # the bar counts answered items
        try:
            for item in limited:
                batch.append(item)
                if len(batch) == batch_size:
                    run(batch)
                    progress.advance(task, len(batch))
                    batch = []
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if batch:
            run(batch)
            progress.advance(task, len(batch))
