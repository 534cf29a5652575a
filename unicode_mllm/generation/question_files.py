"""Question files for batch answering: JSONL in (`{"image": PATH, "question": TEXT}` a line), JSONL out.

An image path is relative to the JSONL file's folder unless absolute; a line without "image" (or with
null) asks a text-only question. Every other field is kept and written back next to "answer".
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unicode_mllm.errors import UserError

log = logging.getLogger(__name__)

_KNOWN_KEYS = ("image", "question")


@dataclass(frozen=True)
class QuestionRecord:
    """One line: its fields as read, the resolved image path (None: text only) and the question."""

    fields: dict[str, Any]
    image: Path | None
    question: str
    line: int


def read_questions_jsonl(path: str | Path) -> list[QuestionRecord]:
    """Parse a question file. Raises UserError naming the file and line of a bad record."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"question file {path} not found; pass a JSONL file of {{'image', 'question'}} lines")
    records = []
    for number, text in enumerate(read_utf8_lines(path), start=1):
        if not text.strip():
            continue
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exn:
            raise UserError(f"{path}:{number}: not valid JSON ({exn.msg}); write one JSON object per line") from None
        if not isinstance(fields, dict):
            raise UserError(f"{path}:{number}: expected a JSON object with 'question', got {type(fields).__name__}")
        question = fields.get("question")
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"{path}:{number}: 'question' is missing or empty")
        _warn_misspelled_keys(fields, path, number)
        image = fields.get("image")
        if image is not None and not isinstance(image, str):
            raise UserError(f"{path}:{number}: 'image' must be a path string or null, got {type(image).__name__}")
        resolved = None if image is None else (Path(image) if Path(image).is_absolute() else path.parent / image)
        records.append(QuestionRecord(fields, resolved, question, number))
    if not records:
        raise UserError(f"question file {path} holds no questions")
    return records


def read_utf8_lines(path: Path) -> list[str]:
    """The file's lines (split at "\n" only: JSON text may hold a raw U+2028); UserError naming the line of
    the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return [line.removesuffix("\r") for line in data.decode("utf-8").split("\n")]
    except UnicodeDecodeError as exn:
        line = data[: exn.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte {exn.start} is {data[exn.start]:#04x}); save the file as UTF-8"
        ) from None


def _warn_misspelled_keys(fields: dict[str, Any], path: Path, number: int) -> None:
    """Other keys are kept as written, but one that looks like a missing 'image' or 'question' is likely a typo."""
    for key in fields:
        if key in _KNOWN_KEYS:
            continue
        close = [k for k in difflib.get_close_matches(key.lower(), _KNOWN_KEYS, n=1, cutoff=0.6) if k not in fields]
        if close:
            log.warning(
                "%s:%d: unknown key %r, not %r: this line is read without it; rename it to %r",
                path,
                number,
                key,
                close[0],
                close[0],
            )


def check_question_images(records: list[QuestionRecord], path: Path) -> None:
    """Decode every image before any answering (answering decodes it again, rather than holding a whole file's
    images in memory), so a bad image late in the file loses no work; UserError naming the file, line and image."""
    from unicode_mllm.data.image_io import load_image

    checked: set[Path] = set()  # many questions share an image: decode each file once
    for record in records:
        if record.image is not None and record.image not in checked:
            checked.add(record.image)
            try:
                load_image(record.image)
            except UserError as exn:
                raise UserError(f"{path}:{record.line}: {exn}") from None


def answer_record(record: QuestionRecord, answer: str) -> str:
    """The output line: the input fields plus "answer" (JSON, no trailing newline)."""
    return json.dumps({**record.fields, "answer": answer}, ensure_ascii=False)
