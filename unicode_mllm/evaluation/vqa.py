"""Exact-match VQA accuracy, per question kind and overall, for any `answer_fn`.

The model is reached only through `answer_fn(images, questions) -> answers` (lists of equal length,
images as RGB PIL images at their stored size), so this module does not depend on how the model
answers; the CLI passes `UniCodeMLLM.answer` with greedy decoding. Questions are sent in batches of
`batch_size`.

Scoring: a prediction is correct when `answers.normalise_answer(prediction)` equals the normalised
form of any reference answer (lower-case, punctuation and the articles a/an/the removed, number
words zero..ten as digits, whitespace collapsed). This is plain exact match, not VQAv2's
min(#annotators agreeing / 3, 1) soft score.

Question sources:
- `shapes_vqa_items`: the `qa` list ({"question", "answer", "kind"}) of each sample of a shapes shard
  split (by default `heldout`, images that contain held-out colour+shape pairs); kinds are the
  world's `QA_KINDS` (colour, shape, size, count, position, exists, background).
- `jsonl_vqa_items`: a JSONL file of {"image": path, "question": str, "answers": [str, ...]} lines,
  optionally with "kind" (or VQAv2's "question_type") for the per-kind breakdown, else kind
  "untyped". Relative image paths are read from the JSONL's folder (or `image_root`).
Lines or samples that cannot be used (bad JSON, a missing field, an unreadable image) are counted
skips with their line or sample name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from unicode_mllm.data.image_io import ImageDecodeError, load_image
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation.answers import is_correct
from unicode_mllm.evaluation.item_batches import run_in_batches
from unicode_mllm.evaluation.skips import SkipCounts
from unicode_mllm.generation.question_files import read_utf8_lines

AnswerFn = Callable[[list[Image.Image], list[str]], list[str]]
UNTYPED = "untyped"
MAX_MISTAKES = 20  # wrong answers kept as examples in the report
BAD_RECORD = "bad record"
BAD_JSON = "bad json"


@dataclass(frozen=True)
class VQAItem:
    image: Image.Image
    question: str
    answers: tuple[str, ...]
    kind: str
    source: str  # "shard.tar:key" or "file.jsonl:line N"


@dataclass
class VQAResult:
    """Counts per question kind; `to_dict()` is the JSON report."""

    source: dict[str, Any]
    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    mistakes: list[dict[str, Any]] = field(default_factory=list)
    skips: SkipCounts = field(default_factory=SkipCounts)

    @property
    def num_questions(self) -> int:
        return sum(self.total.values())

    @property
    def accuracy(self) -> float:
        return sum(self.correct.values()) / self.num_questions

    def per_kind(self) -> dict[str, dict[str, Any]]:
        return {
            kind: {"correct": self.correct[kind], "total": n, "accuracy": self.correct[kind] / n}
            for kind, n in sorted(self.total.items())
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "num_questions": self.num_questions,
            "accuracy": self.accuracy,
            "per_kind": self.per_kind(),
            "skipped": self.skips.to_dict(),
            "mistakes": self.mistakes,
        }

    def summary_lines(self) -> list[str]:
        kinds = ", ".join(f"{k} {100 * v['accuracy']:.1f}% ({v['total']})" for k, v in self.per_kind().items())
        return [
            f"VQA exact match {100 * self.accuracy:.2f}% over {self.num_questions} questions; {self.skips.summary()}",
            f"per kind: {kinds}",
        ]


def eval_vqa(
    answer_fn: AnswerFn,
    items: Iterable[VQAItem],
    *,
    batch_size: int = 16,
    limit: int | None = None,
    source: dict[str, Any] | None = None,
    skips: SkipCounts | None = None,
) -> VQAResult:
    """Ask `answer_fn` every question of `items` (at most `limit`) in batches and score the answers.

    `skips` collects what the item reader skipped (pass the one given to the reader). Raises
    ValueError when answer_fn returns other than one string per question or batch_size/limit < 1,
    UserError when there is no question to ask.
    """
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch_size and limit must be >= 1 (got {batch_size}, {limit})")
    result = VQAResult(source=dict(source or {}), skips=skips if skips is not None else SkipCounts())

    def run(batch: list[VQAItem]) -> None:
        predictions = answer_fn([it.image for it in batch], [it.question for it in batch])
        if not isinstance(predictions, list) or len(predictions) != len(batch):
            got = len(predictions) if isinstance(predictions, list) else type(predictions).__name__
            raise ValueError(f"answer_fn must return a list of {len(batch)} answers (one per question), got {got}")
        for item, prediction in zip(batch, predictions, strict=True):
            if not isinstance(prediction, str):
                raise ValueError(f"answer_fn returned a {type(prediction).__name__} for {item.source}; answers are str")
            ok = is_correct(prediction, list(item.answers))
            result.total[item.kind] = result.total.get(item.kind, 0) + 1
            result.correct[item.kind] = result.correct.get(item.kind, 0) + ok
            if not ok and len(result.mistakes) < MAX_MISTAKES:
                result.mistakes.append(
                    {
                        "source": item.source,
                        "kind": item.kind,
                        "question": item.question,
                        "prediction": prediction,
                        "answers": list(item.answers),
                    }
                )

    run_in_batches(items, run, batch_size=batch_size, limit=limit, description="answering questions")
    if not result.num_questions:
        raise UserError(f"no questions to evaluate in {result.source}; {result.skips.summary()}")
    return result


def shapes_vqa_items(data_dir: str | Path, split: str, skips: SkipCounts) -> Iterator[VQAItem]:
    """The questions of every sample of a shapes shard split, in manifest order (see the module docstring)."""
    from unicode_mllm.data.stream import SkipReport, StreamingDataset

    stream = StreamingDataset.from_folder(data_dir, split, shuffle=False, image_format="pil")
    report = SkipReport()
    try:
        for sample in stream:
            if not report.add(sample):
                continue
            name = f"{sample['shard']}:{sample['key']}"
            qa = sample["meta"].get("qa")
            if sample["image"] is None:
                skips.skip("text-only sample", name)
                continue
            if not isinstance(qa, list) or not qa:
                skips.skip(BAD_RECORD, name, f"{name}: no 'qa' list in its json; is this a shapes shard set?")
                continue
            for i, pair in enumerate(qa):
                if not (isinstance(pair, dict) and all(isinstance(pair.get(k), str) for k in ("question", "answer"))):
                    skips.skip(BAD_RECORD, f"{name}#{i}", f"{name}: qa[{i}] lacks a 'question' or 'answer' string")
                    continue
                kind = pair.get("kind") if isinstance(pair.get("kind"), str) else UNTYPED
                yield VQAItem(sample["image"], pair["question"], (pair["answer"],), kind, f"{name}#{i}")
    finally:
        skips.add_counts(dict(report.skipped), report.broken_shards)


def jsonl_vqa_items(path: str | Path, skips: SkipCounts, image_root: str | Path | None = None) -> Iterator[VQAItem]:
    """The questions of a JSONL file (see the module docstring). Raises UserError when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"VQA file {path} not found; pass a JSONL file of image/question/answers lines")
    root = Path(image_root) if image_root is not None else path.parent
    for number, line in enumerate(read_utf8_lines(path), start=1):  # UserError naming a line that is not UTF-8
        if not line.strip():
            continue
        name = f"{path.name}:line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exn:
            skips.skip(BAD_JSON, name, f"{name}: not valid JSON ({exn.msg})")
            continue
        problem = _record_problem(record)
        if problem:
            skips.skip(BAD_RECORD, name, f"{name}: {problem}")
            continue
        image_path = Path(record["image"])
        image_path = image_path if image_path.is_absolute() else root / image_path
        try:
            image = load_image(image_path, mode="RGB", name=f"{name} ({record['image']})")
        except ImageDecodeError as exn:
            skips.skip(exn.reason, name, str(exn))
            continue
        kind = record.get("kind", record.get("question_type", UNTYPED))
        yield VQAItem(image, record["question"], tuple(record["answers"]), str(kind), name)


def _record_problem(record: Any) -> str | None:
    """Why a JSONL record cannot be used, or None."""
    if not isinstance(record, dict):
        return f"holds a {type(record).__name__}, not an object"
    for key in ("image", "question"):
        if not isinstance(record.get(key), str) or not record[key]:
            return f"'{key}' must be a non-empty string"
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return "'answers' must be a non-empty list of strings"
    return None


def eval_vqa_shapes(
    answer_fn: AnswerFn, data_dir: str | Path, split: str = "heldout", *, batch_size: int = 16, limit: int | None = None
) -> VQAResult:
    """`eval_vqa` on the questions of a shapes shard split."""
    skips = SkipCounts()
    return eval_vqa(
        answer_fn,
        shapes_vqa_items(data_dir, split, skips),
        batch_size=batch_size,
        limit=limit,
        source={"kind": "shapes", "data_dir": str(data_dir), "split": split},
        skips=skips,
    )


def eval_vqa_jsonl(
    answer_fn: AnswerFn,
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    batch_size: int = 16,
    limit: int | None = None,
) -> VQAResult:
    """`eval_vqa` on the questions of a JSONL file."""
    skips = SkipCounts()
    return eval_vqa(
        answer_fn,
        jsonl_vqa_items(path, skips, image_root),
        batch_size=batch_size,
        limit=limit,
        source={"kind": "jsonl", "path": str(path)},
        skips=skips,
    )
