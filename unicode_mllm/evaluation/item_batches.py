"""The evaluation loop over a stream of items: batches of `batch_size`, at most `limit` items, a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from unicode_mllm.runtime.progress import track

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
    seen = 0
    stream = iter(items)
    try:
        for item in track(stream, description):
            batch.append(item)
            seen += 1
            if len(batch) == batch_size:
                run(batch)
                batch = []
            if limit is not None and seen >= limit:
                break
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    if batch:
        run(batch)
