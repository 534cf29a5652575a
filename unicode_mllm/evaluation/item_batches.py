"""The evaluation loop over a stream of items: batches of `batch_size`, at most `limit` items, a progress bar;
and its question-answering form, which checks that the model answered every question with a string."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

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


class Question(Protocol):
    image: Any
    question: str
    source: str


Q = TypeVar("Q", bound=Question)


def ask_in_batches(
    answer_fn: Callable[[list[Any], list[str]], Any],
    items: Iterable[Q],
    on_answer: Callable[[Q, str], None],
    *,
    batch_size: int,
    limit: int | None,
    description: str,
) -> None:
    """`run_in_batches` for questions: `answer_fn(images, questions)` per batch, then `on_answer(item, answer)`.

    Raises ValueError when answer_fn returns other than one string per question.
    """

    def run(batch: list[Q]) -> None:
        answers = answer_fn([it.image for it in batch], [it.question for it in batch])
        if not isinstance(answers, list) or len(answers) != len(batch):
            got = len(answers) if isinstance(answers, list) else type(answers).__name__
            raise ValueError(f"answer_fn must return a list of {len(batch)} answers (one per question), got {got}")
        for item, answer in zip(batch, answers, strict=True):
            if not isinstance(answer, str):
                raise ValueError(f"answer_fn returned a {type(answer).__name__} for {item.source}; answers are str")
            on_answer(item, answer)

    run_in_batches(items, run, batch_size=batch_size, limit=limit, description=description)
