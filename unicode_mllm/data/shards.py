"""Write and describe webdataset shards: one tar prefix per split plus a `manifest.json`.

Layout of a data folder `OUT/`::

    OUT/manifest.json
    OUT/train-000000.tar   OUT/train-000001.tar   ...   (about `maxcount` samples each)
    OUT/val-000000.tar     ...

Each sample in a shard is the tar members `KEY.json` (a UTF-8 JSON object, the sample's metadata) and,
when the sample has an image, `KEY.png` or `KEY.jpg` (the encoded image). The writer adds one reserved
field to every JSON object, `"has_image": true|false`, so a reader can tell a text-only sample (json
only, by design) from a sample whose image member was lost.

`manifest.json` (written atomically, temp file + rename)::

    {"format": "unicode_mllm.shards", "format_version": 1,
     "created": {"utc": "...", "unicode_mllm": "0.1.0", "webdataset": "1.0.2", "python": "3.11.7"},
     "generator_config": {...},            # the settings of whatever wrote the shards
     "splits": {"train": {"num_samples": 2500,
                          "shards": [{"name": "train-000000.tar", "num_samples": 1000}, ...]}},
     "extra": {...}}                       # e.g. a converter's skip counts

Readers take the shard list from the manifest, never from a glob, so a stale or half-written shard in
the folder is never read, and per-shard counts let the stream loader tell how many samples a truncated
shard lost.

img2dataset folders (read as they are, no conversion)
-----------------------------------------------------
`img2dataset --output_format webdataset` writes a folder without a manifest::

    OUT/00000.tar  OUT/00000_stats.json  OUT/00000.parquet  OUT/00001.tar ...

Each tar holds per downloaded sample `KEY.jpg` (or `.png`/`.webp`, per `--encode_format`), `KEY.txt`
(the caption) and `KEY.json` (url, key, status, caption, width, height, original_width, original_height,
exif, sha256, ...), keys being 9-digit strings such as "000000012"; only successful downloads are in the
tar. `NNNNN_stats.json` holds the shard's "count", "successes", "failed_to_download", "failed_to_resize".
When a folder has no manifest.json but holds such `NNNNN.tar` files, `read_manifest` builds the manifest
in memory: one split `train` with every tar in numeric order, per-shard counts from the stats file's
"successes" (or, without a usable stats file, the distinct keys of the tar that have an image member,
read from the member names only), `generator_config = {"generator": "img2dataset", ...}` and the
stats totals under `extra["img2dataset"]`. Image sizes vary, so `Manifest.image_size()` is None.
Its JSON has no `has_image` field: a sample without an image member is a counted "missing image".
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import tarfile
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from unicode_mllm import __version__
from unicode_mllm.data.image_io import encode_png
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.checkpoint import atomic_write_text
from unicode_mllm.runtime.progress import make_progress

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "unicode_mllm.shards"
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = ("png", "jpg")  # what the writer stores; readers also accept jpeg and webp members
HAS_IMAGE_FIELD = "has_image"  # reserved JSON field the writer adds to every sample

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")  # webdataset splits member names at the first "."
_SPLIT_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")
_RECORD_FIELDS = frozenset({"key", "image", "image_ext", "meta"})
_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff"}
# Fixed member mtime: the same records give byte-identical shards (webdataset's TarWriter honours it).
_MEMBER_MTIME = 0.0

IMG2DATASET_GENERATOR = "img2dataset"
IMG2DATASET_SPLIT = "train"  # img2dataset has no splits: the whole folder is one
_IMG2DATASET_SHARD = re.compile(r"^(\d+)\.tar$")
_IMG2DATASET_STATS = ("count", "successes", "failed_to_download", "failed_to_resize")
_READ_IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp"})  # the image members StreamingDataset decodes
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)\.([^/]*)$")  # webdataset's key/extension split of a member name


@dataclass(frozen=True)
class ShardInfo:
    """One shard file (its name inside the data folder) and how many samples it holds."""

    name: str
    num_samples: int


@dataclass(frozen=True)
class SplitSummary:
    """What `write_split` wrote for one split: total samples and the shards in order."""

    split: str
    num_samples: int
    shards: tuple[ShardInfo, ...]
    num_text_only: int = 0  # samples stored as json only (no image member)

    def to_json(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "num_text_only": self.num_text_only,
            "shards": [{"name": s.name, "num_samples": s.num_samples} for s in self.shards],
        }


@dataclass(frozen=True)
class Manifest:
    """A parsed `manifest.json`; `root` is the folder that holds it and the shards."""

    root: Path
    format_version: int
    splits: dict[str, SplitSummary]
    generator_config: dict[str, Any]
    created: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def location(self) -> str:
        """What error messages call this manifest: the manifest.json, or the img2dataset folder it was built from."""
        if self.generator_config.get("generator") == IMG2DATASET_GENERATOR:
            return f"{self.root} (img2dataset folder)"
        return str(self.root / MANIFEST_NAME)

    def split(self, split: str) -> SplitSummary:
        """The summary of `split`; raises UserError listing the available splits when it is absent."""
        if split not in self.splits:
            raise UserError(f"{self.location}: no split {split!r}; available splits: {sorted(self.splits)}")
        return self.splits[split]

    def shard_urls(self, split: str) -> list[str]:
        """Paths of the split's shards, in manifest order."""
        return [str(self.root / s.name) for s in self.split(split).shards]

    def shard_counts(self, split: str) -> dict[str, int]:
        """Expected samples per shard path (the keys are what `shard_urls` returns)."""
        return {str(self.root / s.name): s.num_samples for s in self.split(split).shards}

    def source_generator_config(self) -> Any:
        """The generator_config of the folder the images were made in: a `tokenize` folder keeps its source's as
        `source_generator`, followed here through repeated tokenizing (not necessarily a dict)."""
        config: Any = self.generator_config
        for _ in range(8):  # a tokenize of a tokenize ...; the bound stops a cycle
            if not isinstance(config, dict) or config.get("generator") != "tokenize":
                break
            config = config.get("source_generator")
        return config

    def image_size(self) -> tuple[int, int] | None:
        """The (h, w) every image of this folder should have, when its writer fixed one; else None.

        Read from the source generator config: `shapes.image_size` of a `data shapes` folder, or a converter's
        `expected_size` (an int for a square image, or [h, w]). Anything else (or a malformed value) is None.
        """
        config = self.source_generator_config()
        if not isinstance(config, dict):
            return None
        if config.get("generator") == "shapes":
            shapes = config.get("shapes")
            size = shapes.get("image_size") if isinstance(shapes, dict) else None
        else:
            size = config.get("expected_size")
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size, size
        if (
            isinstance(size, (list, tuple))
            and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            return int(size[0]), int(size[1])
        return None


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
    seen_keys: set[str] = set()
    per_shard: Counter[str] = Counter()
    num_text_only = 0
    # "%" in the folder name would be read as a format directive by ShardWriter's pattern.
    pattern = str(staging).replace("%", "%%") + os.sep + f"{split}-%06d.tar"
    try:
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
# reading


def _parse_split(path: Path, name: str, raw: Any) -> SplitSummary:
    fix = "re-run the conversion that wrote it"
    try:
        shards = tuple(ShardInfo(str(s["name"]), int(s["num_samples"])) for s in raw["shards"])
        num_samples = int(raw["num_samples"])
        num_text_only = int(raw.get("num_text_only", 0))
    except (KeyError, TypeError, ValueError) as exn:
        raise UserError(f"{path}: split {name!r} is malformed ({type(exn).__name__}: {exn}); {fix}") from None
    if sum(s.num_samples for s in shards) != num_samples:
        raise UserError(
            f"{path}: split {name!r} says {num_samples} samples but its shards sum to "
            f"{sum(s.num_samples for s in shards)}; {fix}"
        )
    for s in shards:
        if Path(s.name).name != s.name:
            raise UserError(f"{path}: shard name {s.name!r} must be a plain file name; {fix}")
    return SplitSummary(name, num_samples, shards, num_text_only)


def read_manifest(data_dir: str | os.PathLike) -> Manifest:
    """Read and check `data_dir/manifest.json`; without one, describe an img2dataset folder (module docstring).

    Raises UserError (one line, with the fix) when the folder or manifest is missing, the JSON is
    corrupt, the format is foreign or newer than this code, or the counts do not add up.
    """
    root = Path(data_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise UserError(f"{root}: no such data folder; check the path (it should hold {MANIFEST_NAME})")
    if not path.is_file():
        img2dataset_shards = _img2dataset_shards(root)
        if img2dataset_shards:
            return _img2dataset_manifest(root, img2dataset_shards)
        raise UserError(
            f"{path} not found; write the shards with unicode_mllm.data.shards or a converter, "
            "or point to the folder that holds manifest.json (or img2dataset's 00000.tar, 00001.tar, ...)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; re-run the conversion that wrote it") from None
    except json.JSONDecodeError as exn:
        raise UserError(
            f"{path} is not valid JSON (line {exn.lineno}: {exn.msg}); re-run the conversion that wrote it"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not a {MANIFEST_FORMAT} manifest; re-run the conversion that wrote it")
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise UserError(
            f"{path}: format_version {version!r} is not readable by this code (reads 1..{FORMAT_VERSION}); "
            "upgrade unicode-mllm or re-create the shards"
        )
    splits_raw = raw.get("splits")
    if not isinstance(splits_raw, dict):
        raise UserError(f"{path}: 'splits' is missing or not an object; re-run the conversion that wrote it")
    splits = {name: _parse_split(path, name, value) for name, value in splits_raw.items()}
    return Manifest(
        root=root,
        format_version=version,
        splits=splits,
        generator_config=dict(raw.get("generator_config") or {}),
        created=dict(raw.get("created") or {}),
        extra=dict(raw.get("extra") or {}),
    )


def _img2dataset_shards(root: Path) -> list[Path]:
    """The `NNNNN.tar` files of an img2dataset folder, in shard-number order (empty for any other folder)."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _IMG2DATASET_SHARD.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def _img2dataset_stats(tar: Path) -> dict[str, int] | None:
    """The integer counts of `NNNNN_stats.json` next to `tar`, when it exists and holds "successes"; else None."""
    path = tar.with_name(f"{tar.stem}_stats.json")
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exn:
        logger.warning("%s is unreadable (%s); counting the samples of %s from the tar", path, exn, tar.name)
        return None
    stats = {
        k: v
        for k in _IMG2DATASET_STATS
        if isinstance(raw, dict) and isinstance(v := raw.get(k), int) and not isinstance(v, bool) and v >= 0
    }
    if "successes" not in stats:
        logger.warning("%s has no 'successes' count; counting the samples of %s from the tar", path, tar.name)
        return None
    return stats


@lru_cache(maxsize=4096)
def _count_tar_samples(path: str, mtime_ns: int, size: int) -> int:
    """Distinct keys with an image member, from member names only (headers are read, data is skipped).

    Cached per (path, mtime, size): every reader of the folder calls `read_manifest` again. A tar that cannot be
    read to the end gives what was counted so far; the stream reader then counts it as a broken shard.
    """
    keys: set[str] = set()
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                match = _MEMBER_NAME.match(member.name) if member.isreg() else None
                if match and match.group(2).lower() in _READ_IMAGE_EXTENSIONS:
                    keys.add(match.group(1))
    except (OSError, tarfile.TarError, EOFError) as exn:
        logger.warning("%s is not a readable tar to the end (%s); counted %d samples", path, exn, len(keys))
    return len(keys)


def _img2dataset_manifest(root: Path, tars: list[Path]) -> Manifest:
    """The in-memory manifest of an img2dataset webdataset folder (see the module docstring)."""
    shards: list[ShardInfo] = []
    totals: Counter[str] = Counter()
    without_stats: list[str] = []
    for tar in tars:
        stats = _img2dataset_stats(tar)
        if stats is None:
            stat = tar.stat()
            shards.append(ShardInfo(tar.name, _count_tar_samples(str(tar), stat.st_mtime_ns, stat.st_size)))
            without_stats.append(tar.name)
        else:
            shards.append(ShardInfo(tar.name, stats["successes"]))
            totals.update(stats)
    summary = SplitSummary(IMG2DATASET_SPLIT, sum(s.num_samples for s in shards), tuple(shards))
    logger.info("%s: no %s, read as an img2dataset folder of %d shards", root, MANIFEST_NAME, len(shards))
    return Manifest(
        root=root,
        format_version=FORMAT_VERSION,
        splits={IMG2DATASET_SPLIT: summary},
        generator_config={"generator": IMG2DATASET_GENERATOR, "folder": str(root.resolve()), "num_shards": len(tars)},
        extra={IMG2DATASET_GENERATOR: {"stats": dict(totals), "shards_without_stats": without_stats}},
    )


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
