"""Convert an image folder or a LLaVA-style JSON file into shards + manifest (see `shards`).

The converters (these two, and COCO captions / VQAv2 in `coco_vqa`) read every input, write the good
samples through `shards.write_split`, and count the bad ones by reason in a `ConversionReport` (never a
crash, never a silent drop). The report's counts are also stored in the manifest under
`extra.conversion`, and the converter's settings under `generator_config`. An animated image (GIF, APNG,
animated WebP) becomes a sample of its first frame and is counted as a warning, "animated image: first
frame used" (`image_io.ANIMATED_IMAGE`), so the summary says how many there were.

Sample metadata written (the writer adds `has_image`):

* image folder: `{"source": "sub/cat.jpg", "caption": "a cat" | None, "height": h, "width": w}`.
* LLaVA: `{"id": ..., "image_source": "coco/1.jpg" | None, "conversations": [{"from", "value"}, ...]}`,
  `id` exactly as in the file (any JSON type), `from` normalised to "human"/"gpt" (ShareGPT-style
  "user"/"assistant" are accepted as aliases). A text-only record (no "image" field) is stored as a
  json-only sample (`has_image: false`), so it stays in the same split and order as the image samples.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unicode_mllm.constants import IMAGE_PLACEHOLDER
from unicode_mllm.data.image_io import ANIMATED_IMAGE, ImageDecodeError, encode_png, frame_count, load_image
from unicode_mllm.data.shards import write_manifest, write_split
from unicode_mllm.errors import UserError
from unicode_mllm.shard_manifest import SplitSummary, read_manifest

logger = logging.getLogger(__name__)

IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
ImageStorage = Literal["png", "original"]
_KEEP_ORIGINAL = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}  # what "original" can store as-is
HUMAN, GPT = "human", "gpt"
ROLE_ALIASES = {"user": HUMAN, "assistant": GPT}  # ShareGPT-style exports name the roles this way


@dataclass
class ConversionReport:
    """What a converter wrote and what it skipped, by reason, with the offending names."""

    out_dir: Path
    split: str
    num_inputs: int = 0
    num_written: int = 0
    num_text_only: int = 0
    num_without_caption: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    # Problems that cost no sample, by reason: a kept sample's oddity (a repeated id), or an input entry left
    # out of the samples (a caption of an image that is not in the file, a question without an answer).
    warned: dict[str, list[str]] = field(default_factory=dict)
    split_summary: SplitSummary | None = None

    def skip(self, reason: str, name: str, message: str) -> None:
        self.skipped.setdefault(reason, []).append(name)
        logger.warning("skipping %s", message)

    def warn(self, reason: str, name: str, message: str) -> None:
        """Count a problem that costs no sample (see `warned`), e.g. a repeated id or a caption of an unknown image."""
        self.warned.setdefault(reason, []).append(name)
        logger.warning("%s", message)

    def warn_counts(self) -> dict[str, int]:
        return {reason: len(names) for reason, names in self.warned.items()}

    @property
    def num_skipped(self) -> int:
        return sum(len(names) for names in self.skipped.values())

    def skip_counts(self) -> dict[str, int]:
        return {reason: len(names) for reason, names in self.skipped.items()}

    def summary(self) -> str:
        """One line: "wrote 9 of 10 samples to out (split train, 1 shard); skipped 1: 1 corrupt image (bad.png)"."""
        shards = len(self.split_summary.shards) if self.split_summary else 0
        text = (
            f"wrote {self.num_written} of {self.num_inputs} samples to {self.out_dir} "
            f"(split {self.split}, {shards} shard{'s' if shards != 1 else ''})"
        )
        if self.num_text_only:
            text += f", {self.num_text_only} text-only"
        if self.num_without_caption:
            text += f", {self.num_without_caption} without caption"
        if self.skipped:
            text += f"; skipped {self.num_skipped}: " + _by_reason(self.skipped)
        if self.warned:
            text += f"; warnings {sum(len(n) for n in self.warned.values())}: " + _by_reason(self.warned)
        return text


def _by_reason(names_by_reason: dict[str, list[str]]) -> str:
    """ "2 corrupt image (a.png, b.png), 1 missing image (c.png)": most frequent first, three names each."""
    parts = []
    for reason, names in sorted(names_by_reason.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        parts.append(f"{len(names)} {reason} ({shown})")
    return ", ".join(parts)


def _is_dangling(path: Path) -> bool:
    """True for a symlink whose target does not exist (at any depth of a link chain)."""
    return path.is_symlink() and not path.exists()


@dataclass(frozen=True)
class ShardOutput:
    """How a converter writes its split: the keyword options every converter takes (`**options`), declared here
    once with their defaults; an unknown one is a TypeError."""

    image_storage: ImageStorage = "png"  # "png" (decoded pixels re-encoded) or "original" (png/jpg/jpeg bytes kept)
    expected_size: int | tuple[int, int] | None = None  # skip images of another size; None: any size
    maxcount: int = 1000  # samples per shard
    overwrite: bool = False  # replace a split already in out_dir
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        if self.image_storage not in ("png", "original"):
            raise ValueError(f"image_storage {self.image_storage!r} is unknown; choose one of ['original', 'png']")


def _image_record(report: ConversionReport, path: Path, name: str, output: ShardOutput) -> tuple[Any, str, Any]:
    """Decode (verify) an image; return (stored bytes, extension, decoded image). Raises ImageDecodeError.

    An animated file is stored as its first frame (PNG, even for "original": its own bytes hold every frame)
    and counted in `report` as a warning."""
    img = load_image(path, expected_size=output.expected_size, name=name)
    frames = frame_count(img)
    if frames > 1:
        report.warn(ANIMATED_IMAGE, name, f"{name}: animated image ({frames} frames): the first frame is used")
        return encode_png(img), "png", img
    ext = _KEEP_ORIGINAL.get(path.suffix.lower())
    if output.image_storage == "original" and ext is not None:
        return path.read_bytes(), ext, img
    return encode_png(img), "png", img


def _read_image(
    report: ConversionReport,
    root: Path,
    image_rel: str,
    name: str,
    label: str,
    output: ShardOutput,
) -> dict[str, Any] | None:
    """The image fields of a record ({"image": bytes, "image_ext": ext}) for `root / image_rel`, or None after
    counting the skip under `name`: a path that leads outside `root` (never read), a missing, corrupt or
    wrong-size image. `label` is what the messages call the image."""
    if not _inside(os.path.abspath(root), image_rel):
        message = f"{label}: image path {image_rel!r} leads outside --images {root}; make it relative to the image root"
        report.skip("image outside root", name, message)
        return None
    try:
        data, ext, _ = _image_record(report, root / image_rel, label, output)
    except ImageDecodeError as exn:
        report.skip(exn.reason, name, str(exn))
        return None
    return {"image": data, "image_ext": ext}


def _write(
    report: ConversionReport,
    records: Iterable[dict[str, Any]],
    converter_config: dict[str, Any],
    output: ShardOutput,
    total: int | None = None,
) -> ConversionReport:
    """Every converter's last step: write `records` as split `report.split` of `report.out_dir`, then the manifest,
    whose generator_config is `converter_config` (converter, inputs, split, ...) and the storage options."""
    out = report.out_dir
    summary = write_split(
        records, out, report.split, output.maxcount, output.progress, overwrite=output.overwrite, total=total
    )
    config = {
        **converter_config,
        "image_storage": output.image_storage,
        "expected_size": output.expected_size,
        "maxcount": output.maxcount,
    }
    return _finish(report, out, summary, config)


def _finish(
    report: ConversionReport,
    out_dir: Path,
    summary: SplitSummary,
    generator_config: dict[str, Any],
) -> ConversionReport:
    report.split_summary = summary
    if summary.num_samples == 0:
        raise UserError(f"no sample could be converted: {report.summary()}; fix the input and run again")
    extra = {
        "conversion": {"num_inputs": report.num_inputs, "skipped": report.skip_counts(), "warned": report.warn_counts()}
    }
    write_manifest(
        out_dir, [*_other_splits(out_dir, summary.split, generator_config), summary], generator_config, extra=extra
    )
    logger.info("%s", report.summary())
    return report


def _other_splits(out_dir: Path, split: str, generator_config: dict[str, Any]) -> list[SplitSummary]:
    """The splits an earlier run of the same converter wrote into `out_dir` (e.g. COCO's train before its val),
    kept in the new manifest so that converting a second split never hides the first."""
    try:
        manifest = read_manifest(out_dir)
    except UserError:
        return []  # no (readable) manifest yet
    others = {name: s for name, s in manifest.splits.items() if name != split}
    if not others:
        return []
    if manifest.generator_config.get("converter") != generator_config.get("converter"):
        logger.warning(
            "%s held splits %s of another converter (%s); the new manifest lists only split %r",
            out_dir,
            sorted(others),
            manifest.generator_config.get("converter") or manifest.generator_config.get("generator"),
            split,
        )
        return []
    return [s for s in others.values() if all((out_dir / shard.name).is_file() for shard in s.shards)]


def convert_image_folder(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str = "train",
    recursive: bool = True,
    captions_from: Literal["sidecar", "none"] = "sidecar",
    **options: Any,  # ShardOutput's fields
) -> ConversionReport:
    """Turn every image file (png/jpg/jpeg/webp/bmp/gif) under `folder` into a sample of `split`.

    Files are taken in sorted path order; keys are their positions ("00000000", ...). The caption is
    the text of the sidecar `name.txt` next to `name.ext` (stripped) when `captions_from="sidecar"`
    and it exists; otherwise None. Every image is fully decoded first; `image_storage="png"` stores the
    decoded RGB pixels as PNG, "original" keeps png/jpg/jpeg bytes verbatim (others become PNG).
    Unreadable images and caption files are skipped, counted by reason and named in the report; an
    animated image gives its first frame, counted as a warning.

    Returns the ConversionReport. Raises UserError when the folder is missing, holds no image files,
    or no image could be converted.
    """
    src = Path(folder)
    if captions_from not in ("sidecar", "none"):
        raise ValueError(f"captions_from {captions_from!r} is unknown; choose one of ['none', 'sidecar']")
    output = ShardOutput(**options)
    if not src.is_dir():
        raise UserError(f"{src}: no such image folder; check the path")
    candidates = src.rglob("*") if recursive else src.iterdir()
    # A dangling symlink is not a file but is listed (and then counted as a missing image), never dropped.
    files = sorted(
        p for p in candidates if (p.is_file() or _is_dangling(p)) and p.suffix.lower() in IMAGE_FILE_SUFFIXES
    )
    if not files:
        raise UserError(
            f"{src}: no image files ({', '.join(IMAGE_FILE_SUFFIXES)}) found"
            + ("" if recursive else " (recursive=False)")
            + "; check the folder"
        )
    report = ConversionReport(out_dir=Path(out_dir), split=split, num_inputs=len(files))
    records = _image_folder_records(report, src, files, captions_from, output)
    config = {
        "converter": "image_folder",
        "folder": str(src.resolve()),
        "split": split,
        "recursive": recursive,
        "captions_from": captions_from,
    }
    return _write(report, records, config, output)


def _image_folder_records(
    report: ConversionReport,
    src: Path,
    files: list[Path],
    captions_from: str,
    output: ShardOutput,
) -> Iterator[dict[str, Any]]:
    """The records of `convert_image_folder`, one per readable image of `files` (in order); skips are counted in
    `report`."""
    for path in files:
        name = path.relative_to(src).as_posix()
        if _is_dangling(path):
            target = os.readlink(path)
            report.skip("missing image", name, f"{path}: dangling symlink to {target}; fix or remove the link")
            continue
        caption = None
        sidecar = path.with_suffix(".txt")
        if captions_from == "sidecar" and sidecar.is_file():
            try:
                caption = sidecar.read_text(encoding="utf-8").strip()
            except (UnicodeDecodeError, OSError) as exn:
                report.skip("unreadable caption", name, f"{sidecar}: caption is not UTF-8 text ({exn})")
                continue
        try:
            data, ext, img = _image_record(report, path, name, output)
        except ImageDecodeError as exn:
            report.skip(exn.reason, name, str(exn))
            continue
        report.num_without_caption += caption is None and captions_from == "sidecar"
        meta = {"source": name, "caption": caption, "height": img.height, "width": img.width}
        yield {"key": f"{report.num_written:08d}", "image": data, "image_ext": ext, "meta": meta}
        report.num_written += 1


def normalise_roles(conversations: Any) -> Any:
    """The conversation with the roles of `ROLE_ALIASES` ("user", "assistant") renamed "human"/"gpt"; anything
    that is not a list of objects is returned unchanged (for `check_conversation` to reject)."""
    if not isinstance(conversations, list):
        return conversations
    return [
        {**turn, "from": ROLE_ALIASES[turn["from"]]}
        if isinstance(turn, dict) and isinstance(turn.get("from"), str) and turn["from"] in ROLE_ALIASES
        else turn
        for turn in conversations
    ]


def check_conversation(conversations: Any, has_image: bool) -> tuple[str, str] | None:
    """Validate a LLaVA conversation; return None when valid, else (reason, explanation).

    Roles "user"/"assistant" count as "human"/"gpt" (`normalise_roles`).
    Rules: a non-empty list of {"from": "human"|"gpt", "value": str} with no empty (blank) value, where a
    human turn holding only `<image>` counts as a question; turns alternate starting with
    human and ending with gpt; with an image, `<image>` appears exactly once, in a human turn; without
    one, it does not appear at all.
    """
    if not isinstance(conversations, list) or not conversations:
        return "malformed record", "'conversations' must be a non-empty list"
    conversations = normalise_roles(conversations)
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return "malformed record", f"turn {i} must be an object with a string 'value'"
        if turn.get("from") not in (HUMAN, GPT):
            return "malformed record", (
                f"turn {i} is from {turn.get('from')!r}, expected 'human' or 'gpt' (or 'user' / 'assistant')"
            )
    for i, turn in enumerate(conversations):
        if not turn["value"].replace(IMAGE_PLACEHOLDER, "").strip() and not (
            turn["from"] == HUMAN and IMAGE_PLACEHOLDER in turn["value"]
        ):
            kind = "question" if turn["from"] == HUMAN else "answer"
            return "empty turn", f"turn {i} is an empty {kind}; give it text or remove the record"
    roles = [turn["from"] for turn in conversations]
    for i, role in enumerate(roles):
        if role != (HUMAN if i % 2 == 0 else GPT):
            return "bad turn order", f"turn {i} is from {role!r}; turns must alternate human/gpt from human"
    if roles[-1] != GPT:
        return "bad turn order", "the last turn is from 'human' and has no answer"
    in_human = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations if t["from"] == HUMAN)
    in_gpt = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations if t["from"] == GPT)
    if has_image and (in_human != 1 or in_gpt):
        return "image placeholder mismatch", (
            f"{IMAGE_PLACEHOLDER} appears {in_human} times in human turns and {in_gpt} in gpt turns; "
            "an image sample needs it exactly once, in a human turn"
        )
    if not has_image and in_human + in_gpt:
        return "image placeholder mismatch", f"a text-only record contains {IMAGE_PLACEHOLDER}"
    return None


def _inside(root_abs: str, image_rel: str) -> bool:
    """Whether `image_rel` (relative, or absolute) names a path under `root_abs`, judged on the text
    (`..` resolved lexically), so symlinked folders inside the root stay allowed."""
    path = os.path.normpath(os.path.join(root_abs, image_rel))
    return os.path.commonpath([root_abs, path]) == root_abs


def _load_json(path: Path, what: str, top_level: type, expected: str) -> Any:
    """Parse a JSON input file whose top level must be a `top_level` (`expected` says what the user should give);
    one-line UserError naming the file (`what` kind of file) otherwise."""
    if not path.is_file():
        raise UserError(f"{path}: no such {what}; check the path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; re-export it as UTF-8 JSON") from None
    except json.JSONDecodeError as exn:
        raise UserError(f"{path}: not valid JSON (line {exn.lineno}: {exn.msg}); fix the file") from None
    if not isinstance(data, top_level):
        raise UserError(f"{path}: top level is a {type(data).__name__}; expected {expected}")
    return data


def convert_llava_json(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str = "train",
    **options: Any,  # ShardOutput's fields
) -> ConversionReport:
    """Convert a LLaVA-style JSON list into shards of `split`.

    Each record is `{"id", "image": path relative to image_root (optional), "conversations": [...]}`.
    A record is skipped, counted by reason and named (by id, or "#index") in the report when it is
    not an object or has a bad conversation (see `check_conversation`: "malformed record", "bad turn
    order", "empty turn", "image placeholder mismatch"), when its image path leaves `image_root` ("image
    outside root": `..` or an absolute path elsewhere; skipped, never read), or when its image is missing,
    corrupt or of the wrong size. A record whose id repeats an earlier one is kept and counted in the
    report's `warned` ("duplicate id"). Records without "image" are kept as text-only (json-only) samples.
    `id` is stored as it is (int, str, null, ...); roles "user"/"assistant" are stored as "human"/"gpt".

    Returns the ConversionReport. Raises UserError when the JSON file is missing or not a list, or no
    record could be converted.
    """
    src, root = Path(json_path), Path(image_root)
    output = ShardOutput(**options)
    data = _load_json(src, "LLaVA JSON file", list, "a list of records")
    if not root.is_dir():
        raise UserError(f"{root}: no such image root folder; check the path")
    report = ConversionReport(out_dir=Path(out_dir), split=split, num_inputs=len(data))
    config = {
        "converter": "llava_json",
        "json_path": str(src.resolve()),
        "image_root": str(root.resolve()),
        "split": split,
    }
    return _write(report, _llava_records(report, data, root, output), config, output)


def _llava_records(
    report: ConversionReport, data: list[Any], root: Path, output: ShardOutput
) -> Iterator[dict[str, Any]]:
    """The records of `convert_llava_json`, one per valid LLaVA record of `data` (in order); skips counted in
    `report`."""
    seen_ids: set[str] = set()
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            report.skip("malformed record", f"#{index}", f"record #{index}: not an object")
            continue
        name = str(record.get("id", f"#{index}"))
        image_rel = record.get("image")
        if image_rel is not None and not isinstance(image_rel, str):
            report.skip("malformed record", name, f"record {name}: 'image' must be one path string")
            continue
        conversations = normalise_roles(record.get("conversations"))
        problem = check_conversation(conversations, has_image=image_rel is not None)
        if problem is not None:
            report.skip(problem[0], name, f"record {name}: {problem[1]}")
            continue
        out_record: dict[str, Any] = {"key": f"{report.num_written:08d}", "image": None}
        if image_rel is not None:
            label = f"record {name} ({image_rel})"
            image = _read_image(report, root, image_rel, name, label, output)
            if image is None:
                continue
            out_record.update(image)
        else:
            report.num_text_only += 1
        if "id" in record:
            # Compared as JSON text, so the int 1 and the string "1" are different ids, as they are in the file.
            id_text = json.dumps(record["id"], sort_keys=True)
            if id_text in seen_ids:
                message = f"record {name}: id repeats an earlier record's; kept, but give it a new id"
                report.warn("duplicate id", name, message)
            seen_ids.add(id_text)
        out_record["meta"] = {"id": record.get("id"), "image_source": image_rel, "conversations": conversations}
        yield out_record
        report.num_written += 1
