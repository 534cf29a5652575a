"""VQA accuracy for any `answer_fn`: VQAv2's official metric or exact match, per question and answer type.

The model is reached only through `answer_fn(images, questions) -> answers` (lists of equal length,
images as RGB PIL images at their stored size), so this module does not depend on how the model
answers; the CLI passes `generation.answer` with greedy decoding. Questions are sent in batches of
`batch_size`.

Scoring, per question (`metric`):
- "vqav2": the official VQAv2 accuracy against the human answers (`vqav2_metric.vqav2_accuracy`: official
  normalisation, mean over the leave-one-out subsets of min(#humans agreeing / 3, 1)).
- "exact": 1 when `answers.normalise_answer(prediction)` equals the normalised form of any reference answer
  (lower-case, punctuation and the articles a/an/the removed, number words zero..ten as digits), else 0.
  This is the shapes world's score, and GQA's: GQA's own eval.py compares the raw strings, so this is at
  least as lenient (case, punctuation, articles and number words do not count here).
- "auto" (default): "vqav2" for a question with at least VQAV2_MIN_ANSWERS reference answers (human votes,
  e.g. VQAv2's ten), "exact" for one with fewer (one answer, or a few accepted alternatives). Four is the
  fewest on which a prediction every human agrees with can reach 1.0 under VQAv2's min(#/3, 1), so a shorter
  list cannot be a vote.

Question sources (each yields `VQAItem`s; what cannot be used is a counted skip with its name):
- `shapes_vqa_items`: the `qa` list of each sample of a shard split: the shapes world's {"question",
  "answer", "kind"} (one answer), or `data from-vqav2`'s {"question", "answers" (ten), "question_id",
  "question_type", "answer_type"}.
- `jsonl_vqa_items`: a JSONL file of {"image": path, "question": str, "answers": [str, ...]} lines (or
  "answer": str), optionally with "kind" or "question_type", "answer_type" and "question_id". Relative image
  paths are read from the JSONL's folder (or `image_root`).
- `question_file_items`: the official files, read directly: VQAv2's questions + annotations JSON (images
  named by `--image-pattern`), or GQA's questions JSON ({question id: {"imageId", "question", "answer",
  "types"}}, images `{imageId}.jpg`; the kind is the question's structural type).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from unicode_mllm.data.image_io import ImageDecodeError, load_image
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation.answers import is_correct
from unicode_mllm.evaluation.item_batches import ask_in_batches
from unicode_mllm.evaluation.skips import MAX_NAMES_PER_REASON, SkipCounts
from unicode_mllm.evaluation.vqav2_metric import VQAv2Scores, official_round, vqav2_accuracy
from unicode_mllm.generation.question_files import read_utf8_lines

AnswerFn = Callable[[list[Image.Image], list[str]], list[str]]
UNTYPED = "untyped"
MAX_MISTAKES = 20  # wrong answers kept as examples in the report
BAD_RECORD = "bad record"
BAD_JSON = "bad json"
METRICS = ("auto", "vqav2", "exact")
VQAV2_MIN_ANSWERS = 4  # "auto": see the module docstring
GQA_IMAGE_PATTERN = "{image_id}.jpg"  # GQA's images/ folder
METRIC_DESCRIPTIONS = {
    "vqav2": "VQAv2 accuracy (official: min(#humans agreeing / 3, 1) over the leave-one-out subsets, "
    "GT-Vision-Lab/VQA vqaEval.py)",
    "exact": "exact match after normalisation (lower-case, punctuation and articles dropped, number words "
    "as digits) with any reference answer",
}


@dataclass(frozen=True)
class VQAItem:
    image: Image.Image
    question: str
    answers: tuple[str, ...]
    kind: str  # the question type
    source: str  # "shard.tar:key#i", "file.jsonl:line N" or "question N"
    question_id: int | str | None = None
    answer_type: str | None = None  # VQAv2's "yes/no", "number", "other"


def metric_for(answers: Sequence[str], metric: str = "auto") -> str:
    """The metric that scores a question with these reference answers ("auto": see the module docstring)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric != "auto":
        return metric
    return "vqav2" if len(answers) >= VQAV2_MIN_ANSWERS else "exact"


def score_answer(prediction: str, answers: Sequence[str], metric: str) -> float:
    """The score of one prediction in [0, 1] under "vqav2" or "exact" (an int 0 or 1 for exact match)."""
    if metric == "vqav2":
        return vqav2_accuracy(prediction, answers)
    return int(is_correct(prediction, list(answers)))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; '|' in a cell is escaped."""

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def _percent(total: float, n: int) -> str:
    """100 * total / n as the official code computes and rounds it (see vqav2_metric.official_round)."""
    return f"{official_round(100 * total / n):.2f}"


@dataclass
class VQAResult:
    """Scores per question, per question type (kind) and per answer type; `to_dict()` is the JSON report."""

    source: dict[str, Any]
    metric: str = "auto"  # as requested; `metric_name` says what scored the questions
    scores: list[float] = field(default_factory=list)  # per question, in the order asked
    correct: dict[str, float] = field(default_factory=dict)  # per kind: the sum of its scores (a count for exact)
    total: dict[str, int] = field(default_factory=dict)
    answer_type_correct: dict[str, float] = field(default_factory=dict)
    answer_type_total: dict[str, int] = field(default_factory=dict)
    questions_per_metric: dict[str, int] = field(default_factory=dict)
    vqav2: VQAv2Scores = field(default_factory=VQAv2Scores)  # the questions scored with "vqav2"
    predictions: list[tuple[int | str, str]] = field(default_factory=list)  # (question id, answer) where known
    mistakes: list[dict[str, Any]] = field(default_factory=list)
    skips: SkipCounts = field(default_factory=SkipCounts)

    def add(self, item: VQAItem, prediction: str) -> None:
        """Score one answer and count it under its kind, answer type and metric."""
        metric = metric_for(item.answers, self.metric)
        score = score_answer(prediction, item.answers, metric)
        self.scores.append(score)
        self.total[item.kind] = self.total.get(item.kind, 0) + 1
        self.correct[item.kind] = self.correct.get(item.kind, 0) + score
        if item.answer_type is not None:
            self.answer_type_total[item.answer_type] = self.answer_type_total.get(item.answer_type, 0) + 1
            self.answer_type_correct[item.answer_type] = self.answer_type_correct.get(item.answer_type, 0) + score
        self.questions_per_metric[metric] = self.questions_per_metric.get(metric, 0) + 1
        if metric == "vqav2":
            self.vqav2.add(score, item.kind, item.answer_type or UNTYPED)
        if item.question_id is not None:
            self.predictions.append((item.question_id, prediction))
        if score < 1 and len(self.mistakes) < MAX_MISTAKES:
            mistake: dict[str, Any] = {"source": item.source, "kind": item.kind, "question": item.question}
            mistake.update(prediction=prediction, answers=list(item.answers))
            if metric == "vqav2":
                mistake["score"] = score
            self.mistakes.append(mistake)

    @property
    def num_questions(self) -> int:
        return len(self.scores)

    @property
    def accuracy(self) -> float:
        """The mean score over questions, in [0, 1], full precision."""
        return sum(self.scores) / self.num_questions

    @property
    def metric_name(self) -> str:
        """The metric that scored the questions: vqav2, exact, or vqav2+exact (mixed answer counts under auto)."""
        return "+".join(m for m in ("vqav2", "exact") if self.questions_per_metric.get(m))

    def per_kind(self) -> dict[str, dict[str, Any]]:
        return {
            kind: {"correct": self.correct[kind], "total": n, "accuracy": self.correct[kind] / n}
            for kind, n in sorted(self.total.items())
        }

    def per_answer_type(self) -> dict[str, dict[str, Any]]:
        return {
            t: {"correct": self.answer_type_correct[t], "total": n, "accuracy": self.answer_type_correct[t] / n}
            for t, n in sorted(self.answer_type_total.items())
        }

    def official_results(self) -> list[dict[str, Any]] | None:
        """The answers in the benchmark's results format, or None when no question id is known: VQAv2's
        [{"question_id", "answer"}] (what the official server takes), GQA's [{"questionId", "prediction"}]."""
        if not self.predictions:
            return None
        keys = ("questionId", "prediction") if self.source.get("kind") == "gqa" else ("question_id", "answer")
        return [{keys[0]: qid, keys[1]: answer} for qid, answer in self.predictions]

    def to_dict(self) -> dict[str, Any]:
        """Fractions ("accuracy") and percentages ("accuracy_percent") at full precision; the "vqav2" block
        adds the official rounded figures."""
        report: dict[str, Any] = {
            "source": self.source,
            "metric": self.metric_name,
            "metric_requested": self.metric,
            "questions_per_metric": dict(self.questions_per_metric),
            "num_questions": self.num_questions,
            "accuracy": self.accuracy,
            "accuracy_percent": 100 * sum(self.scores) / self.num_questions,
            "per_kind": self.per_kind(),
        }
        if self.answer_type_total:
            report["per_answer_type"] = self.per_answer_type()
        if self.vqav2.num_questions:
            report["vqav2"] = self.vqav2.to_dict()
        return {**report, "skipped": self.skips.to_dict(), "mistakes": self.mistakes}

    def summary_lines(self) -> list[str]:
        kinds = ", ".join(f"{k} {100 * v['accuracy']:.1f}% ({v['total']})" for k, v in self.per_kind().items())
        if self.metric_name == "exact":  # the shapes world's line, as before
            head = f"VQA exact match {100 * self.accuracy:.2f}%"
        else:
            used = ", ".join(f"{m} on {n}" for m, n in sorted(self.questions_per_metric.items()))
            head = f"VQA accuracy {_percent(sum(self.scores), self.num_questions)}% ({used})"
        lines = [f"{head} over {self.num_questions} questions; {self.skips.summary()}"]
        if self.answer_type_total:
            types = ", ".join(
                f"{t} {_percent(v['correct'], v['total'])}% ({v['total']})" for t, v in self.per_answer_type().items()
            )
            lines.append(f"per answer type: {types}")
        lines.append(f"per kind: {kinds}" if len(self.total) <= 12 else f"per kind: {len(self.total)} kinds (report)")
        return lines

    def to_markdown(self, title: str, settings: dict[str, Any]) -> str:
        """A settings table and a table of rows: overall, per answer type, per question type (kind)."""
        metric = "; ".join(f"{m}: {METRIC_DESCRIPTIONS[m]}" for m in self.metric_name.split("+"))
        rows = [("overall", self.num_questions, _percent(sum(self.scores), self.num_questions))]
        for label, groups in (("answer type", self.per_answer_type()), ("question type", self.per_kind())):
            rows += [(f"{label}: {name}", v["total"], _percent(v["correct"], v["total"])) for name, v in groups.items()]
        settings = {**settings, "metric": metric, "questions": self.num_questions, "skipped": self.skips.summary()}
        return "\n".join(
            [
                f"# {title}",
                "",
                markdown_table(("setting", "value"), list(settings.items())),
                "",
                markdown_table(("rows", "questions", "accuracy (%)"), rows),
                "",
                "Accuracy in percent, rounded to 2 decimals as the official VQAv2 code rounds; the JSON report "
                "holds full precision.",
                "",
            ]
        )


def eval_vqa(
    answer_fn: AnswerFn,
    items: Iterable[VQAItem],
    *,
    batch_size: int = 16,
    limit: int | None = None,
    source: dict[str, Any] | None = None,
    skips: SkipCounts | None = None,
    metric: str = "auto",
) -> VQAResult:
    """Ask `answer_fn` every question of `items` (at most `limit`) in batches and score the answers with
    `metric` ("auto", "vqav2" or "exact": see the module docstring).

    `skips` collects what the item reader skipped (pass the one given to the reader). Raises
    ValueError when answer_fn returns other than one string per question, batch_size/limit < 1 or the
    metric is unknown; UserError when there is no question to ask.
    """
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch_size and limit must be >= 1 (got {batch_size}, {limit})")
    metric_for((), metric)  # ValueError for an unknown name, before any question is asked
    result = VQAResult(source=dict(source or {}), metric=metric, skips=skips if skips is not None else SkipCounts())

    ask_in_batches(answer_fn, items, result.add, batch_size=batch_size, limit=limit, description="answering questions")
    if not result.num_questions:
        raise UserError(f"no questions to evaluate in {result.source}; {result.skips.summary()}")
    return result


# ---------------------------------------------------------------------------------------- question sources


def _string_list(value: Any) -> tuple[str, ...] | None:
    """A non-empty list of strings as a tuple, else None."""
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value):
        return tuple(value)
    return None


def _reference_answers(record: dict[str, Any]) -> tuple[str, ...] | None:
    """A record's "answers" list (human answers or alternatives), else its one "answer" string, else None."""
    answers = _string_list(record.get("answers"))
    if answers is None and isinstance(record.get("answer"), str):
        answers = (record["answer"],)
    return answers


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _question_id(value: Any) -> int | str | None:
    return value if (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str) else None


def shapes_vqa_items(data_dir: str | Path, split: str, skips: SkipCounts) -> Iterator[VQAItem]:
    """The questions of every sample of a shard split (shapes or `data from-vqav2`), in manifest order."""
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
                skips.skip(BAD_RECORD, name, f"{name}: no 'qa' list in its json; is this a shapes or VQAv2 shard set?")
                continue
            for i, pair in enumerate(qa):
                answers = _reference_answers(pair) if isinstance(pair, dict) else None
                if answers is None or not isinstance(pair.get("question"), str):
                    message = f"{name}: qa[{i}] lacks a 'question' string or reference answers ('answer'/'answers')"
                    skips.skip(BAD_RECORD, f"{name}#{i}", message)
                    continue
                kind = _optional_str(pair.get("kind")) or _optional_str(pair.get("question_type")) or UNTYPED
                yield VQAItem(
                    sample["image"],
                    pair["question"],
                    answers,
                    kind,
                    f"{name}#{i}",
                    _question_id(pair.get("question_id")),
                    _optional_str(pair.get("answer_type")),
                )
    finally:
        skips.add_counts(dict(report.skipped), report.broken_shards)


class ImageCache:
    """Loads images, keeping the last one: consecutive questions about one image decode it once."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.image: Image.Image | None = None

    def load(self, path: Path, name: str) -> Image.Image:
        if path != self.path:
            self.path, self.image = None, None
            self.image = load_image(path, mode="RGB", name=name)  # ImageDecodeError: the caller counts the skip
            self.path = path
        assert self.image is not None
        return self.image


def json_lines(path: Path, skips: SkipCounts) -> Iterator[tuple[str, Any]]:
    """(name "file:line N", parsed JSON) of every non-blank line of a JSON-lines file; a line that is not JSON is a
    counted "bad json" skip. UserError names a line that is not UTF-8."""
    for number, line in enumerate(read_utf8_lines(path), start=1):
        if not line.strip():
            continue
        name = f"{path.name}:line {number}"
        try:
            yield name, json.loads(line)
        except json.JSONDecodeError as exn:
            skips.skip(BAD_JSON, name, f"{name}: not valid JSON ({exn.msg})")


def jsonl_vqa_items(path: str | Path, skips: SkipCounts, image_root: str | Path | None = None) -> Iterator[VQAItem]:
    """The questions of a JSONL file (see the module docstring). Raises UserError when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"VQA file {path} not found; pass a JSONL file of image/question/answers lines")
    root = Path(image_root) if image_root is not None else path.parent
    images = ImageCache()
    for name, record in json_lines(path, skips):
        problem = _record_problem(record)
        if problem:
            skips.skip(BAD_RECORD, name, f"{name}: {problem}")
            continue
        image_path = Path(record["image"])
        image_path = image_path if image_path.is_absolute() else root / image_path
        try:
            image = images.load(image_path, f"{name} ({record['image']})")
        except ImageDecodeError as exn:
            skips.skip(exn.reason, name, str(exn))
            continue
        kind = record.get("kind", record.get("question_type", UNTYPED))
        answers = _reference_answers(record)
        assert answers is not None  # _record_problem checked
        question_id, answer_type = _question_id(record.get("question_id")), _optional_str(record.get("answer_type"))
        yield VQAItem(image, record["question"], answers, str(kind), name, question_id, answer_type)


def _record_problem(record: Any) -> str | None:
    """Why a JSONL record cannot be used, or None."""
    if not isinstance(record, dict):
        return f"holds a {type(record).__name__}, not an object"
    for key in ("image", "question"):
        if not isinstance(record.get(key), str) or not record[key]:
            return f"'{key}' must be a non-empty string"
    if _reference_answers(record) is None:
        return "'answers' must be a non-empty list of strings (or 'answer' a string)"
    return None


def question_file_items(
    questions: str | Path,
    annotations: str | Path | None,
    images: str | Path,
    skips: SkipCounts,
    *,
    image_pattern: str | None = None,
    subset: str | None = None,
) -> tuple[Iterator[VQAItem], dict[str, Any]]:
    """The questions of an official question file, read now (a bad file fails before any model loads), and
    the source description for the report.

    VQAv2 (a top-level "questions" list): `annotations` is required (the ten human answers); the image of a
    question is `images / image_pattern.format(subset=..., image_id=...)` (default
    "COCO_{subset}_{image_id:012d}.jpg", subset from the files' "data_subtype"); the kind is the annotation's
    question_type, with its answer_type. The files are read and checked as `data from-vqav2` reads them
    (`unicode_mllm.data.coco_vqa`), so an entry it leaves out is left out here, as a counted skip by reason.
    GQA ({question id: {"imageId", "question", "answer", "types"}}): no `annotations`; images
    `images / "{image_id}.jpg"` unless `image_pattern` says otherwise; the kind is types["structural"].
    Raises UserError for a missing file or folder, an unknown layout or a missing --annotations.
    """
    from unicode_mllm.data.converters import _load_json

    q_path, root = Path(questions), Path(images)
    data = _load_json(q_path, "question file", dict, "VQAv2's questions object or GQA's {question id: question}")
    if not root.is_dir():
        raise UserError(f"--images {root}: no such image folder; pass the folder that holds the question images")
    if isinstance(data.get("questions"), list):
        return _vqav2_items(q_path, data, annotations, root, skips, image_pattern, subset)
    if data and all(isinstance(v, dict) and "imageId" in v for v in data.values()):
        if annotations is not None:
            raise UserError(f"{q_path} is a GQA question file, which holds its answers; drop --annotations")
        return _gqa_items(q_path, data, root, skips, image_pattern or GQA_IMAGE_PATTERN)
    raise UserError(
        f"{q_path}: neither VQAv2 questions (a 'questions' list) nor GQA questions ({{id: {{'imageId', "
        "'question', 'answer'}}}}); pass one of those files, or use --jsonl"
    )


def _vqav2_items(
    q_path: Path,
    q_data: dict[str, Any],
    annotations: str | Path | None,
    root: Path,
    skips: SkipCounts,
    image_pattern: str | None,
    subset: str | None,
) -> tuple[Iterator[VQAItem], dict[str, Any]]:
    # The converter's own readers (private there, shared on purpose: one reading of the official files).
    from unicode_mllm.data.coco_vqa import (
        VQAV2_IMAGE_PATTERN,
        _list_field,
        _pattern_fields,
        _subset,
        _vqa_answers,
        _vqa_questions,
    )
    from unicode_mllm.data.converters import ConversionReport, _load_json

    if annotations is None:
        raise UserError(
            f"{q_path} holds VQAv2 questions without answers; pass --annotations (e.g. "
            "v2_mscoco_val2014_annotations.json: test-dev answers are not public)"
        )
    a_path = Path(annotations)
    pattern = image_pattern or VQAV2_IMAGE_PATTERN
    fields = _pattern_fields(pattern)
    a_data = _load_json(a_path, "VQAv2 annotations file", dict, 'an object with an "annotations" list')
    a_list = _list_field(a_path, a_data, "annotations", "VQAv2 annotations file")
    subset = _subset(q_data, a_data, subset)
    if subset is None and "subset" in fields:
        raise UserError(f"{q_path}: no 'data_subtype' to fill {{subset}} of the image pattern; pass --subset val2014")
    # The readers count what they leave out on a ConversionReport; it only collects those warnings here.
    warnings = ConversionReport(out_dir=q_path.parent, split=subset or "")
    answers = _vqa_answers(a_path, a_list, warnings)
    q_list = _list_field(q_path, q_data, "questions", "VQAv2 questions file")
    by_image = _vqa_questions(q_path, q_list, answers, warnings)
    for reason, names in warnings.warned.items():
        skips.add_counts({reason: len(names)})
        skips.names.setdefault(reason, []).extend(names[:MAX_NAMES_PER_REASON])
    source = {
        "kind": "vqav2",
        "questions": str(q_path),
        "annotations": str(a_path),
        "images": str(root),
        "image_pattern": pattern,
        "subset": subset,
    }

    def items() -> Iterator[VQAItem]:
        for image_id, qa in by_image.items():
            file_name = pattern.format(subset=subset, image_id=image_id)
            try:
                image = load_image(root / file_name, mode="RGB", name=file_name)
            except ImageDecodeError as exn:
                for entry in qa:
                    skips.skip(exn.reason, f"question {entry['question_id']}", str(exn))
                continue
            for entry in qa:
                name = f"question {entry['question_id']}"
                if not entry["answers"]:
                    skips.skip("no human answers", name, f"{a_path.name}: {name} has an empty 'answers' list")
                    continue
                kind = _optional_str(entry["question_type"]) or UNTYPED
                answer_type = _optional_str(entry["answer_type"])
                yield VQAItem(
                    image, entry["question"], tuple(entry["answers"]), kind, name, entry["question_id"], answer_type
                )

    return items(), source


def _gqa_items(
    q_path: Path, data: dict[str, Any], root: Path, skips: SkipCounts, pattern: str
) -> tuple[Iterator[VQAItem], dict[str, Any]]:
    source = {"kind": "gqa", "questions": str(q_path), "images": str(root), "image_pattern": pattern}

    def items() -> Iterator[VQAItem]:
        images = ImageCache()
        for question_id, entry in data.items():
            name = f"question {question_id}"
            if not all(isinstance(entry.get(k), str) and entry[k] for k in ("imageId", "question", "answer")):
                message = f"{q_path.name}: {name} needs 'imageId', 'question' and 'answer' strings"
                skips.skip(BAD_RECORD, name, message)
                continue
            file_name = pattern.format(image_id=entry["imageId"])
            try:
                image = images.load(root / file_name, file_name)
            except ImageDecodeError as exn:
                skips.skip(exn.reason, name, str(exn))
                continue
            types = entry.get("types") if isinstance(entry.get("types"), dict) else {}
            kind = _optional_str(types.get("structural")) or UNTYPED
            yield VQAItem(image, entry["question"], (entry["answer"],), kind, name, question_id)

    return items(), source


def eval_vqa_shapes(
    answer_fn: AnswerFn,
    data_dir: str | Path,
    split: str = "heldout",
    *,
    batch_size: int = 16,
    limit: int | None = None,
    metric: str = "auto",
) -> VQAResult:
    """`eval_vqa` on the questions of a shard split (shapes, or `data from-vqav2` shards)."""
    skips = SkipCounts()
    source = {"kind": "shapes", "data_dir": str(data_dir), "split": split}
    items = shapes_vqa_items(data_dir, split, skips)
    return eval_vqa(answer_fn, items, batch_size=batch_size, limit=limit, source=source, skips=skips, metric=metric)


def eval_vqa_jsonl(
    answer_fn: AnswerFn,
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    metric: str = "auto",
) -> VQAResult:
    """`eval_vqa` on the questions of a JSONL file."""
    skips = SkipCounts()
    source = {"kind": "jsonl", "path": str(path)}
    items = jsonl_vqa_items(path, skips, image_root)
    return eval_vqa(answer_fn, items, batch_size=batch_size, limit=limit, source=source, skips=skips, metric=metric)


def eval_vqa_files(
    answer_fn: AnswerFn,
    questions: str | Path,
    annotations: str | Path | None,
    images: str | Path,
    *,
    image_pattern: str | None = None,
    subset: str | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    metric: str = "auto",
) -> VQAResult:
    """`eval_vqa` on official VQAv2 (questions + annotations) or GQA question files (`question_file_items`)."""
    skips = SkipCounts()
    items, source = question_file_items(
        questions, annotations, images, skips, image_pattern=image_pattern, subset=subset
    )
    return eval_vqa(answer_fn, items, batch_size=batch_size, limit=limit, source=source, skips=skips, metric=metric)
