"""POPE (object hallucination) yes/no evaluation: accuracy, precision, recall, F1 and yes-ratio, with counts.

Source: AoiDragon/POPE, `evaluate.py` (the rules below are its; the code is ours). Questions are POPE's
files as published (`output/coco/coco_pope_random.json`, `_popular`, `_adversarial`): JSON Lines, one
`{"question_id", "image", "text", "label": "yes"|"no"}` a line, the image a file name under `--images`
(COCO val2014 for the COCO sets).

An answer becomes yes or no as evaluate.py decides it (`pope_yes_no`): keep the text before the first '.',
delete the commas, split at single spaces; "no" when one of the words is exactly "No", "no" or "not", else
"yes" ("Not at all." is a yes there, as is an empty answer). "yes" is the positive class:
precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R), accuracy = (TP + TN) / all,
yes-ratio = answers read as yes / all. evaluate.py divides by zero when nothing is answered yes; we report 0.

Unparseable answers: POPE scores every answer without a no-word as "yes", and so do we (the figures stay
POPE's); `unparseable` counts those whose kept words hold neither a no-word nor "yes"/"Yes" (e.g. "Nope",
an empty answer), so a model that does not answer yes/no shows up.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unicode_mllm.data.image_io import ImageDecodeError
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation.item_batches import ask_in_batches
from unicode_mllm.evaluation.skips import SkipCounts
from unicode_mllm.evaluation.vqa import BAD_RECORD, MAX_MISTAKES, AnswerFn, ImageCache, json_lines, markdown_table

NO_WORDS = frozenset({"No", "no", "not"})  # evaluate.py's test, case as written there
YES_WORDS = frozenset({"Yes", "yes"})  # only for counting unparseable answers
LABELS = ("yes", "no")


def _kept_words(answer: str) -> list[str]:
    """evaluate.py's preprocessing: the text before the first '.', commas deleted, split at single spaces."""
    return answer.split(".")[0].replace(",", "").split(" ")


def pope_yes_no(answer: str) -> str:
    """The answer read as "yes" or "no", as POPE's evaluate.py reads it (module docstring)."""
    return "no" if NO_WORDS & set(_kept_words(answer)) else "yes"


def is_unparseable(answer: str) -> bool:
    """True when the kept words hold neither a no-word nor "yes"/"Yes" (POPE still counts it as "yes")."""
    return not (NO_WORDS | YES_WORDS) & set(_kept_words(answer))


@dataclass(frozen=True)
class PopeItem:
    image: Any  # an RGB PIL image
    question: str
    label: str  # "yes" or "no"
    source: str  # "file:line N"
    question_id: Any = None


@dataclass
class PopeResult:
    """Confusion counts of yes/no answers against POPE's labels; `to_dict()` is the JSON report."""

    source: dict[str, Any]
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    unparseable: int = 0
    unparseable_examples: list[dict[str, Any]] = field(default_factory=list)
    mistakes: list[dict[str, Any]] = field(default_factory=list)
    skips: SkipCounts = field(default_factory=SkipCounts)

    def add(self, item: PopeItem, answer: str) -> None:
        predicted = pope_yes_no(answer)
        if predicted == "yes":
            self.tp, self.fp = self.tp + (item.label == "yes"), self.fp + (item.label == "no")
        else:
            self.tn, self.fn = self.tn + (item.label == "no"), self.fn + (item.label == "yes")
        example = {"source": item.source, "question": item.question, "answer": answer, "label": item.label}
        if is_unparseable(answer):
            self.unparseable += 1
            if len(self.unparseable_examples) < MAX_MISTAKES:
                self.unparseable_examples.append(example)
        if predicted != item.label and len(self.mistakes) < MAX_MISTAKES:
            self.mistakes.append({**example, "read_as": predicted})

    @property
    def num_questions(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def metrics(self) -> dict[str, float]:
        """Fractions in [0, 1], full precision (0 where a denominator is 0)."""
        n = self.num_questions
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "accuracy": (self.tp + self.tn) / n,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "yes_ratio": (self.tp + self.fp) / n,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "metric": "pope",
            "num_questions": self.num_questions,
            **self.metrics(),
            "counts": {"TP": self.tp, "FP": self.fp, "TN": self.tn, "FN": self.fn},
            "unparseable": {"count": self.unparseable, "examples": self.unparseable_examples},
            "skipped": self.skips.to_dict(),
            "mistakes": self.mistakes,
        }

    def summary_lines(self) -> list[str]:
        m = self.metrics()
        return [
            f"POPE over {self.num_questions} questions: accuracy {100 * m['accuracy']:.2f}%, precision "
            f"{100 * m['precision']:.2f}%, recall {100 * m['recall']:.2f}%, F1 {100 * m['f1']:.2f}%, "
            f"yes-ratio {100 * m['yes_ratio']:.2f}%",
            f"TP {self.tp}, FP {self.fp}, TN {self.tn}, FN {self.fn}; {self.unparseable} unparseable (read as yes, "
            f"as POPE does); {self.skips.summary()}",
        ]

    def to_markdown(self, title: str, settings: dict[str, Any]) -> str:
        m = self.metrics()
        settings = {
            **settings,
            "metric": "POPE (AoiDragon/POPE evaluate.py: 'no' if the first sentence has the word No, no or not)",
            "questions": self.num_questions,
            "skipped": self.skips.summary(),
        }
        row = [f"{100 * m[k]:.2f}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")]
        row += [self.tp, self.fp, self.tn, self.fn, self.unparseable]
        header = ("accuracy (%)", "precision (%)", "recall (%)", "F1 (%)", "yes (%)", "TP", "FP", "TN", "FN")
        return "\n".join(
            [
                f"# {title}",
                "",
                markdown_table(("setting", "value"), list(settings.items())),
                "",
                markdown_table((*header, "unparseable"), [row]),
                "",
            ]
        )


def pope_items(questions: str | Path, images: str | Path, skips: SkipCounts) -> Iterator[PopeItem]:
    """The questions of a POPE file, checked now (a missing file or folder fails before any model loads);
    images load as the items are taken. Bad lines and unreadable images are counted skips."""
    path, root = Path(questions), Path(images)
    if not path.is_file():
        raise UserError(f"POPE question file {path} not found; pass e.g. coco_pope_random.json (JSON lines)")
    if not root.is_dir():
        raise UserError(f"--images {root}: no such image folder; pass the folder of the POPE images (e.g. val2014/)")
    records = []
    for name, record in json_lines(path, skips):
        if not (
            isinstance(record, dict)
            and all(isinstance(record.get(k), str) and record[k] for k in ("image", "text"))
            and record.get("label") in LABELS
        ):
            skips.skip(BAD_RECORD, name, f"{name}: needs 'image' and 'text' strings and a 'label' of yes or no")
            continue
        records.append((name, record))
    if not records:
        raise UserError(f"POPE question file {path} holds no usable question; {skips.summary()}")

    def items() -> Iterator[PopeItem]:
        cache = ImageCache()
        for name, record in records:
            try:
                image = cache.load(root / record["image"], f"{name} ({record['image']})")
            except ImageDecodeError as exn:
                skips.skip(exn.reason, name, str(exn))
                continue
            yield PopeItem(image, record["text"], record["label"], name, record.get("question_id"))

    return items()


def eval_pope(
    answer_fn: AnswerFn,
    items: Iterable[PopeItem],
    *,
    source: dict[str, Any],
    skips: SkipCounts,
    batch_size: int = 16,
    limit: int | None = None,
) -> PopeResult:
    """Ask every question of `items` (at most `limit`) in batches and count the yes/no answers against the labels.

    `skips` collects what the item reader skipped (pass the one given to `pope_items`). Raises ValueError when
    answer_fn returns other than one string per question or batch_size/limit < 1, UserError when no question
    could be asked.
    """
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch_size and limit must be >= 1 (got {batch_size}, {limit})")
    result = PopeResult(source=source, skips=skips)

    ask_in_batches(
        answer_fn, items, result.add, batch_size=batch_size, limit=limit, description="answering POPE questions"
    )
    if not result.num_questions:
        raise UserError(f"no POPE questions to evaluate in {source}; {skips.summary()}")
    return result


def eval_pope_file(
    answer_fn: AnswerFn, questions: str | Path, images: str | Path, *, batch_size: int = 16, limit: int | None = None
) -> PopeResult:
    """`eval_pope` on a POPE question file and its image folder (`pope_items`)."""
    skips = SkipCounts()
    items = pope_items(questions, images, skips)
    source = {"kind": "pope", "questions": str(questions), "images": str(images)}
    return eval_pope(answer_fn, items, source=source, skips=skips, batch_size=batch_size, limit=limit)
