"""Write and describe webdataset shards: one tar prefix per split plus a `manifest.json`.

Layout of a data folder `OUT/`::

    OUT/manifest.json
    OUT/train-000000.tar   OUT/train-000001.tar   ...   (about `maxcount` samples each)
    OUT/val-000000.tar     ...

Each sample in a shard is the tar members `KEY.json` (a UTF-8 JSON object, the sample's metadata) and,
when the sample has an image, `KEY.png` or `KEY.jpg` (the encoded image). The writer adds one reserved
field to every JSON object, `"has_image": true|false`, so a reader can tell a text-only sample (json
only, by design) from a sample whose image member was lost.

`manifest.json` and how it is read (also img2dataset folders, which have none): `unicode_mllm/shard_manifest.py`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from unicode_mllm import __version__
from unicode_mllm.data.image_io import encode_png
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.checkpoint import atomic_write_text
from unicode_mllm.runtime.progress import make_progress
from unicode_mllm.shard_manifest import (
    FORMAT_VERSION,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    ShardInfo,
    SplitSummary,
    read_manifest,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg")  # what the writer stores; readers also accept jpeg and webp members
HAS_IMAGE_FIELD = "has_image"  # reserved JSON field the writer adds to every sample

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")  # webdataset splits member names at the first "."
_SPLIT_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")
_RECORD_FIELDS = frozenset({"key", "image", "image_ext", "meta"})
_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff"}
# Fixed member mtime: the same records give byte-identical shards (webdataset's TarWriter honours it).
_MEMBER_MTIME = 0.0


# ---------------------------------------------------------------------------------------------------
# writing


def _encode_record(record: Mapping[str, Any], index: int) -> tuple[dict[str, Any], bool]:
    """Validate one record and turn it into a webdataset sample of bytes; returns (sample, has_image)."""
    unknown = set(record) - _RECORD_FIELDS
    if unknown:
        raise ValueError(f"record {index}: unknown fields {sorted(unknown)}; allowed: {sorted(_RECORD_FIELDS)}")
    key = record.get("key")
    if not isinstance(key, str) or not _KEY_PATTERN.match(key):
        raise ValueError(f"record {index}: key {key!r} must be a non-empty string of [A-Za-z0-9_-]")
    meta = record.get("meta", {})
    if not isinstance(meta, Mapping):
        raise ValueError(f"record {key!r}: meta must be a dict, got {type(meta).__name__}")
    image = record.get("image")
    has_image = image is not None
    if meta.get(HAS_IMAGE_FIELD, has_image) != has_image:
        raise ValueError(f"record {key!r}: meta[{HAS_IMAGE_FIELD!r}] is reserved and contradicts the image")
    try:
        text = json.dumps({**meta, HAS_IMAGE_FIELD: has_image}, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exn:
        raise ValueError(f"record {key!r}: meta is not JSON-serialisable ({exn})") from None
    sample: dict[str, Any] = {"__key__": key, "json": text.encode("utf-8")}
    if isinstance(image, Image.Image):
        sample["png"] = encode_png(image)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        ext = record.get("image_ext", "png")
        if ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"record {key!r}: image_ext {ext!r} is unknown; choose one of {IMAGE_EXTENSIONS}")
        data = bytes(image)
        if not data.startswith(_MAGIC[ext]):
            raise ValueError(f"record {key!r}: image bytes do not start like a {ext} file")
        sample[ext] = data
    elif image is not None:
        raise ValueError(f"record {key!r}: image must be PIL.Image, bytes or None, got {type(image).__name__}")
    return sample, has_image


def _existing_shards(out_dir: Path, split: str) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$")
    return sorted(p for p in out_dir.iterdir() if pattern.match(p.name)) if out_dir.is_dir() else []


def _write_staged(
    records: Iterable[Mapping[str, Any]],
    staging: Path,
    split: str,
    maxcount: int,
    maxsize: float,
    progress: bool,
    total: int | None,
) -> tuple[Counter[str], int]:
    """`write_split`'s shards, written into `staging`; returns (samples per shard file name, text-only samples)."""
    seen_keys: set[str] = set()
    per_shard: Counter[str] = Counter()
    num_text_only = 0
    # "%" in the folder name would be read as a format directive by ShardWriter's pattern.
    pattern = str(staging).replace("%", "%%") + os.sep + f"{split}-%06d.tar"
    with (
        make_progress(disable=not progress) as bar,
        wds.ShardWriter(
            pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, encoder=False, mtime=_MEMBER_MTIME
        ) as writer,
    ):
        task = bar.add_task(f"writing {split} shards", total=total, stats="")
        for index, record in enumerate(records):
            sample, has_image = _encode_record(record, index)
            if sample["__key__"] in seen_keys:
                raise ValueError(f"record {index}: duplicate key {sample['__key__']!r} in split {split!r}")
            seen_keys.add(sample["__key__"])
            writer.write(sample)
            per_shard[Path(writer.fname).name] += 1
            num_text_only += not has_image
            bar.advance(task)
    return per_shard, num_text_only


def write_split(
    records: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    split: str,
    maxcount: int = 1000,
    progress: bool = True,
    *,
    maxsize: float = 3e9,
    overwrite: bool = False,
    total: int | None = None,
) -> SplitSummary:
    """Write `records` as shards `OUT/{split}-000000.tar`, ... with at most `maxcount` samples each.

    Args:
        records: dicts with "key" (str of [A-Za-z0-9_-], unique in the split), "meta" (a JSON-able dict),
            "image" (a PIL image, stored as PNG; encoded png/jpg bytes, stored as given; or None for a
            text-only sample) and optionally "image_ext" ("png" default, or "jpg") for bytes.
        out_dir: the data folder (created if needed).
        split: split name ([A-Za-z0-9_]); the shard prefix.
        maxcount, maxsize: a new shard starts after `maxcount` samples or `maxsize` bytes
            (webdataset.ShardWriter's rule; 3e9 is its default, passed explicitly).
        progress: show a rich progress bar. total: the record count, if known, for the bar.
        overwrite: replace this split's existing shards; otherwise existing ones are a UserError.

    Shards are written to a staging folder and moved in only when every record is written, so a crash
    leaves the folder as it was. The manifest is not touched: call `write_manifest` afterwards.

    Returns: the SplitSummary (per-shard counts). Raises ValueError on a malformed record or a
    duplicate key, UserError when shards of the split exist and `overwrite` is False.
    """
    if not _SPLIT_PATTERN.match(split):
        raise ValueError(f"split {split!r} must be a non-empty string of [A-Za-z0-9_]")
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _existing_shards(out, split) and not overwrite:
        raise UserError(
            f"{out} already holds shards of split {split!r}; "
            "pass --overwrite (overwrite=True in Python) or choose an empty folder"
        )

    staging = out / f".staging-{split}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        per_shard, num_text_only = _write_staged(records, staging, split, maxcount, maxsize, progress, total)
        # ShardWriter opens its first file before any write: with no records it is empty, drop it.
        for path in staging.iterdir():
            if path.name not in per_shard:
                path.unlink()
        for old in _existing_shards(out, split):
            old.unlink()
        for name in per_shard:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    shards = tuple(ShardInfo(name, per_shard[name]) for name in sorted(per_shard))
    summary = SplitSummary(split, sum(per_shard.values()), shards, num_text_only)
    logger.info("wrote %d %s samples in %d shards to %s", summary.num_samples, split, len(shards), out)
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def write_manifest(
    out_dir: str | os.PathLike,
    summaries: Iterable[SplitSummary],
    generator_config: Mapping[str, Any],
    *,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `OUT/manifest.json` (atomically) describing exactly the given splits.

    `generator_config` is the writer's settings (paths become strings); `extra` holds anything else
    worth keeping with the data, e.g. a converter's skip counts. Returns the manifest path. Raises
    ValueError on a repeated split or a non-JSON config, UserError when a listed shard file is missing.
    """
    out = Path(out_dir)
    splits: dict[str, Any] = {}
    for summary in summaries:
        if summary.split in splits:
            raise ValueError(f"split {summary.split!r} is given twice")
        for shard in summary.shards:
            if not (out / shard.name).is_file():
                raise UserError(f"{out / shard.name}: shard of split {summary.split!r} is missing; rewrite it")
        splits[summary.split] = summary.to_json()
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": FORMAT_VERSION,
        "created": {
            "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "unicode_mllm": __version__,
            "webdataset": getattr(wds, "__version__", "unknown"),
            "python": platform.python_version(),
        },
        "generator_config": dict(generator_config),
        "splits": splits,
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exn:
        raise ValueError(f"manifest for {out} is not JSON-serialisable ({exn})") from None
    path = out / MANIFEST_NAME
    atomic_write_text(path, text + "\n")
    return path


# ---------------------------------------------------------------------------------------------------
# reading (the manifest itself: `unicode_mllm.shard_manifest.read_manifest`)


def shard_urls(data_dir: str | os.PathLike, split: str) -> list[str]:
    """The shard paths of `split`, in manifest order (UserError lists the splits when it is absent)."""
    return read_manifest(data_dir).shard_urls(split)


def iter_split_records(data_dir: str | os.PathLike, split: str) -> Iterator[dict[str, Any]]:
    """Yield the raw members of every sample of `split` in manifest order (bytes, undecoded).

    A plain, strict reader for tools and tests: a broken shard raises. Training reads through
    `unicode_mllm.data.stream.StreamingDataset`, which counts problems instead.
    """
    urls = shard_urls(data_dir, split)
    yield from wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()) if urls else ()
