"""The `manifest.json` of a shards folder (`data/shards.py` writes both): its format and its reader.

A bottom-layer module (it imports only `errors`) because every layer reads manifests: the stream loader and
the converters, the trainers' up-front checks (`runtime/run_files.py`), the model cards, the evaluations.

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
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from unicode_mllm.errors import UserError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "unicode_mllm.shards"
FORMAT_VERSION = 1

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
