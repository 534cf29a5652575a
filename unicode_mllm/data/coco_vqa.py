"""Convert COCO captions and VQAv2 question/answer files into shards + manifest (see `shards`, `converters`).

Both read the official JSON layouts and write one sample per image, with its image file decoded and
stored like the other converters do (`image_storage`). Problems that cost a sample (a missing or corrupt
image, an image with nothing to learn from) are `skipped`; problems with one entry that cost no sample (a
caption of an image not in the file, a question without an answer) are `warned`; both by reason, with
names, in the `ConversionReport` and in the manifest's `extra.conversion`.

Sample metadata written (the writer adds `has_image`):

* COCO captions: `{"id": image_id, "source": "000000391895.jpg", "caption": "first caption",
  "captions": ["first caption", "second", ...]}` (stripped, in annotation order).
* VQAv2: `{"id": image_id, "source": "COCO_train2014_000000000009.jpg", "qa": [{"question": str,
  "answer": multiple_choice_answer, "answers": [ten answer strings], "question_id": int,
  "answer_type": str, "question_type": str}, ...]}` (questions in file order). `qa` with
  `question`/`answer` is the field the shapes world writes, so stage 2's VQA task reads it unchanged.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unicode_mllm.data.converters import (
    ConversionReport,
    ShardOutput,
    _load_json,
    _read_image,
    _write,
)
from unicode_mllm.errors import UserError

VQAV2_IMAGE_PATTERN = "COCO_{subset}_{image_id:012d}.jpg"  # the file names of the COCO 2014 image zips


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list_field(path: Path, data: dict[str, Any], key: str, what: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise UserError(f"{path}: no {key!r} list at the top level; is this a {what}?")
    return value


def _entry_name(entry: Any, id_key: str, section: str, index: int) -> str:
    """What the report calls one entry of a list: "annotation 48" by its id, else "annotations[3]"."""
    if isinstance(entry, dict) and _is_id(entry.get(id_key)):
        return f"{section.rstrip('s')} {entry[id_key]}"
    return f"{section}[{index}]"


# ------------------------------------------------------------------------------------------ COCO captions


def _coco_images(path: Path, images: list[Any], report: ConversionReport) -> dict[int, str]:
    """image id -> file name, in file order; malformed and repeated entries are skipped (they are inputs)."""
    by_id: dict[int, str] = {}
    for index, entry in enumerate(images):
        image_id = entry.get("id") if isinstance(entry, dict) else None
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        if not _is_id(image_id) or not isinstance(file_name, str) or not file_name:
            message = f"{path.name}: images[{index}] needs an integer 'id' and a 'file_name' string"
            report.skip("malformed entry", f"images[{index}]", message)
        elif image_id in by_id:
            message = f"{path.name}: image id {image_id} ({file_name}) repeats {by_id[image_id]}'s; give it its own id"
            report.skip("duplicate image id", file_name, message)
        else:
            by_id[image_id] = file_name
    return by_id


def _coco_captions(
    path: Path, annotations: list[Any], known: dict[int, str], report: ConversionReport
) -> dict[int, list[str]]:
    """image id -> its captions (stripped, in annotation order); bad annotations are counted as warnings."""
    captions: dict[int, list[str]] = {}
    for index, entry in enumerate(annotations):
        name = _entry_name(entry, "id", "annotations", index)
        image_id = entry.get("image_id") if isinstance(entry, dict) else None
        caption = entry.get("caption") if isinstance(entry, dict) else None
        if not _is_id(image_id) or not isinstance(caption, str) or not caption.strip():
            message = f"{path.name}: {name} needs an integer 'image_id' and a non-empty 'caption'; left out"
            report.warn("malformed caption", name, message)
        elif image_id not in known:
            message = f"{path.name}: {name} is a caption of image {image_id}, which is not in 'images'; left out"
            report.warn("caption of unknown image", name, message)
        else:
            captions.setdefault(image_id, []).append(caption.strip())
    return captions


def convert_coco_captions(
    captions_json: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str = "train",
    **options: Any,  # ShardOutput's fields
) -> ConversionReport:
    """Convert a COCO captions file (`captions_train2017.json` layout) into shards of `split`.

    The file is `{"images": [{"id", "file_name", ...}], "annotations": [{"id", "image_id", "caption"}], ...}`;
    image files are `image_root / file_name`. One sample per image that has a caption, in the order of
    "images" (meta: see the module docstring). Skipped, counted and named: a malformed or repeated image
    entry, an image with no caption ("no caption"), an image outside `image_root`, missing, corrupt or of
    the wrong size. Warned (no sample lost): a malformed or empty caption, a caption whose image_id is
    not in "images" ("caption of unknown image").

    Returns the ConversionReport. Raises UserError when the file or image folder is missing, the file is
    not a COCO captions file, or no image could be converted.
    """
    output = ShardOutput(**options)
    src, root, out = Path(captions_json), Path(image_root), Path(out_dir)
    data = _load_json(src, "COCO captions file", dict, 'an object with "images" and "annotations"')
    images = _list_field(src, data, "images", "COCO captions file")
    annotations = _list_field(src, data, "annotations", "COCO captions file")
    if not root.is_dir():
        raise UserError(f"{root}: no such image folder; pass the folder that holds the COCO images")
    report = ConversionReport(out_dir=out, split=split, num_inputs=len(images))
    file_names = _coco_images(src, images, report)
    captions = _coco_captions(src, annotations, file_names, report)

    def records() -> Iterator[dict[str, Any]]:
        for image_id, file_name in file_names.items():
            texts = captions.get(image_id)
            if not texts:
                report.skip("no caption", file_name, f"{file_name}: image {image_id} has no caption in {src.name}")
                continue
            image = _read_image(report, root, file_name, file_name, file_name, output)
            if image is None:
                continue
            meta = {"id": image_id, "source": file_name, "caption": texts[0], "captions": texts}
            yield {"key": f"{report.num_written:08d}", "meta": meta, **image}
            report.num_written += 1

    config = {
        "converter": "coco_captions",
        "captions_json": str(src.resolve()),
        "image_root": str(root.resolve()),
        "split": split,
    }
    return _write(report, records(), config, output, total=len(file_names))


# ------------------------------------------------------------------------------------------------ VQAv2


def _pattern_fields(pattern: str) -> set[str]:
    """The field names of a str.format pattern; UserError when it uses others than subset and image_id."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
        pattern.format(subset="train2014", image_id=9)
    except (ValueError, KeyError, IndexError) as exn:
        raise UserError(
            f"--image-pattern {pattern!r} is not a valid pattern ({type(exn).__name__}: {exn}); "
            f"use {{subset}} and {{image_id}}, e.g. {VQAV2_IMAGE_PATTERN!r}"
        ) from None
    if "image_id" not in fields:
        raise UserError(f"--image-pattern {pattern!r} has no {{image_id}}; e.g. {VQAV2_IMAGE_PATTERN!r}")
    return fields


def _subset(questions: dict[str, Any], annotations: dict[str, Any] | None, subset: str | None) -> str | None:
    """--subset, else the files' data_subtype; UserError when the two files are of different subsets."""
    q_sub, a_sub = questions.get("data_subtype"), (annotations or {}).get("data_subtype")
    if isinstance(q_sub, str) and isinstance(a_sub, str) and q_sub != a_sub:
        raise UserError(
            f"the questions are of {q_sub!r} but the annotations of {a_sub!r}; pass the annotations of the same subset"
        )
    if subset is not None:
        return subset
    return next((s for s in (q_sub, a_sub) if isinstance(s, str) and s), None)


def _vqa_answers(path: Path, annotations: list[Any], report: ConversionReport) -> dict[int, dict[str, Any]]:
    """question id -> its annotation, checked; malformed and repeated annotations are warned and left out."""
    by_question: dict[int, dict[str, Any]] = {}
    for index, entry in enumerate(annotations):
        name = _entry_name(entry, "question_id", "annotations", index)
        answers = entry.get("answers") if isinstance(entry, dict) else None
        if not (
            isinstance(entry, dict)
            and _is_id(entry.get("question_id"))
            and _is_id(entry.get("image_id"))
            and isinstance(entry.get("multiple_choice_answer"), str)
            and isinstance(answers, list)
            and all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers)
        ):
            message = (
                f"{path.name}: {name} needs integer 'question_id' and 'image_id', a 'multiple_choice_answer' "
                "string and an 'answers' list of {'answer': str}; left out"
            )
            report.warn("malformed annotation", name, message)
        elif entry["question_id"] in by_question:
            report.warn("duplicate annotation", name, f"{path.name}: {name} repeats an earlier one; left out")
        else:
            by_question[entry["question_id"]] = entry
    return by_question


def _vqa_questions(
    path: Path,
    questions: list[Any],
    answers: dict[int, dict[str, Any]] | None,
    report: ConversionReport,
) -> dict[int, list[dict[str, Any]]]:
    """image id -> its `qa` entries (file order; images in order of their first kept question); bad ones warned."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    seen: set[int] = set()
    for index, entry in enumerate(questions):
        name = _entry_name(entry, "question_id", "questions", index)
        if not (
            isinstance(entry, dict)
            and _is_id(entry.get("question_id"))
            and _is_id(entry.get("image_id"))
            and isinstance(entry.get("question"), str)
            and entry["question"].strip()
        ):
            message = f"{path.name}: {name} needs integer 'question_id' and 'image_id' and a 'question'; left out"
            report.warn("malformed question", name, message)
            continue
        question_id, image_id = entry["question_id"], entry["image_id"]
        if question_id in seen:
            report.warn("duplicate question id", name, f"{path.name}: {name} repeats an earlier one; left out")
            continue
        seen.add(question_id)
        annotation = answers.get(question_id) if answers is not None else None
        if answers is not None and annotation is None:
            report.warn("question without annotation", name, f"{path.name}: {name} has no annotation; left out")
            continue
        if annotation is not None and annotation["image_id"] != image_id:
            message = f"{path.name}: {name} is about image {image_id}, its annotation about {annotation['image_id']}"
            report.warn("annotation of another image", name, message + "; left out")
            continue
        by_image.setdefault(image_id, []).append(
            {
                "question": entry["question"].strip(),
                "answer": annotation["multiple_choice_answer"] if annotation else None,
                "answers": [a["answer"] for a in annotation["answers"]] if annotation else [],
                "question_id": question_id,
                "answer_type": annotation.get("answer_type") if annotation else None,
                "question_type": annotation.get("question_type") if annotation else None,
            }
        )
    if answers is not None:
        for question_id in sorted(answers.keys() - seen):
            name = f"annotation {question_id}"
            report.warn("annotation of unknown question", name, f"{name} answers no question in {path.name}")
    return by_image


def convert_vqav2(
    questions_json: str | os.PathLike,
    annotations_json: str | os.PathLike | None,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str = "train",
    *,
    image_pattern: str = VQAV2_IMAGE_PATTERN,
    subset: str | None = None,
    **options: Any,  # ShardOutput's fields
) -> ConversionReport:
    """Convert the official VQAv2 files (`v2_OpenEnded_mscoco_train2014_questions.json` and, optionally,
    `v2_mscoco_train2014_annotations.json`) into shards of `split`, one sample per image.

    The image of `image_id` is `image_root / image_pattern.format(subset=subset, image_id=image_id)`; `subset`
    defaults to the files' "data_subtype" (e.g. "train2014"). Each question becomes one `qa` entry (meta: see
    the module docstring), its answer the annotation's "multiple_choice_answer" and "answers" the ten
    annotators' answers. Without an annotations file (test-dev, whose answers are not public) the questions
    are stored with `"answer": None`, `"answers": []` and null types: such a split is for producing answers
    to submit, not for training or scoring.

    Skipped, counted and named: an image missing, corrupt or of the wrong size (with all its questions).
    Warned and left out (no sample lost): a malformed or repeated question or annotation, a question without
    annotation, an annotation of another image or of no question in the file. `num_inputs` counts images.

    Returns the ConversionReport. Raises UserError when a file or the image folder is missing, a file is
    not a VQAv2 file, the two files are of different subsets, the pattern is bad or needs a subset nobody
    gave, or no image could be converted.
    """
    output = ShardOutput(**options)
    q_src, root, out = Path(questions_json), Path(image_root), Path(out_dir)
    a_src = Path(annotations_json) if annotations_json is not None else None
    fields = _pattern_fields(image_pattern)
    q_data = _load_json(q_src, "VQAv2 questions file", dict, 'an object with a "questions" list')
    questions = _list_field(q_src, q_data, "questions", "VQAv2 questions file")
    a_data, annotations = None, None
    if a_src is not None:
        a_data = _load_json(a_src, "VQAv2 annotations file", dict, 'an object with an "annotations" list')
        annotations = _list_field(a_src, a_data, "annotations", "VQAv2 annotations file")
    subset = _subset(q_data, a_data, subset)
    if subset is None and "subset" in fields:
        raise UserError(f"{q_src}: no 'data_subtype' to fill {{subset}} of the image pattern; pass --subset train2014")
    if not root.is_dir():
        raise UserError(f"{root}: no such image folder; pass the folder that holds the COCO images")
    report = ConversionReport(out_dir=out, split=split)
    answers = _vqa_answers(a_src, annotations, report) if a_src is not None and annotations is not None else None
    qa_by_image = _vqa_questions(q_src, questions, answers, report)
    report.num_inputs = len(qa_by_image)

    def records() -> Iterator[dict[str, Any]]:
        for image_id, qa in qa_by_image.items():
            file_name = image_pattern.format(subset=subset, image_id=image_id)
            image = _read_image(report, root, file_name, file_name, file_name, output)
            if image is None:
                continue
            yield {"key": f"{report.num_written:08d}", "meta": {"id": image_id, "source": file_name, "qa": qa}, **image}
            report.num_written += 1

    config = {
        "converter": "vqav2",
        "questions_json": str(q_src.resolve()),
        "annotations_json": str(a_src.resolve()) if a_src is not None else None,
        "image_root": str(root.resolve()),
        "image_pattern": image_pattern,
        "subset": subset,
        "split": split,
    }
    return _write(report, records(), config, output, total=len(qa_by_image))
