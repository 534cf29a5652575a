"""Question files for batch answering: JSONL in (`{"image": PATH, "question": TEXT}` a line), JSONL out.

An image path is relative to the JSONL file's folder unless absolute; a line without "image" (or with
null) asks a text-only question. Every other field is kept and written back next to "answer".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unicode_mllm.errors import UserError


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
    for number, text in enumerate(path.read_text().splitlines(), start=1):
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
        image = fields.get("image")
        if image is not None and not isinstance(image, str):
            raise UserError(f"{path}:{number}: 'image' must be a path string or null, got {type(image).__name__}")
        resolved = None if image is None else (Path(image) if Path(image).is_absolute() else path.parent / image)
        records.append(QuestionRecord(fields, resolved, question, number))
    if not records:
        raise UserError(f"question file {path} holds no questions")
    return records


def answer_record(record: QuestionRecord, answer: str) -> str:
    """The output line: the input fields plus "answer" (JSON, no trailing newline)."""
    return json.dumps({**record.fields, "answer": answer}, ensure_ascii=False)
