"""Stream a split of webdataset shards as decoded samples, counting every sample that is skipped.

Pipeline (built per iteration, so the epoch, rank and DataLoader worker are current)::

    SimpleShardList (shuffled by seed+epoch) -> split by rank -> split by worker -> note current shard
    -> tarfile_to_samples(handler=counting) -> count samples per shard -> shuffle buffer -> decode -> attach skips

How skips reach the consumer (never drop a sample silently)
--------------------------------------------------------------------
Problems are found inside DataLoader worker processes, so the counts are carried back *with the data*:

* every sample the dataset yields has a `"__skips__"` field: a `SkipDelta` with what this worker skipped
  since its previous yielded sample, or None;
* when a worker's stream ends with counts still pending (e.g. its last shard was truncated), it yields
  one *tally record* `{"__tally_only__": True, "__skips__": delta}` that carries no sample;
* `collate` drops tally records from a batch and merges every delta into the batch's `"__skips__"`;
* in the main process a `SkipReport` sums them: `for batch in report.track(loader): ...` adds each
  item to the report (`report.add(item)` does it by hand), hides tally records and empty batches,
  logs `report.summary()` at the end and raises UserError past `max_skip_fraction`.

Skip reasons: a sample with a corrupt image, a wrong image size (only under the "exact" image policy),
an unsupported image mode, a missing image or json member, bad JSON or an undecodable .txt caption is
skipped and counted under that reason. A shard that cannot be opened or read to the end (truncated,
missing, not a tar) is counted as a broken shard; the samples it
should have held but did not deliver are counted as "lost in broken shard", using the manifest's
per-shard counts (this also catches a tar cut exactly at a member boundary, which `tarfile` reads as a
clean end). Nothing is ever re-raised in the default mode; `strict=True` raises UserError at the first
problem instead.

Images (see `unicode_mllm.data.image_policy`): with an `image_size`, each decoded image is brought to that
size by the `ImagePolicy` (`auto`: exact for folders whose manifest fixes a size, centre crop otherwise);
random crops and flips are drawn from (seed, epoch, sample key). The shards are never rewritten.

Captions: a sample with a `.txt` member (img2dataset's layout `KEY.jpg`, `KEY.txt`, `KEY.json`) whose
JSON has no non-empty "caption" gets the stripped text as `meta["caption"]`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from unicode_mllm.data.image_io import ImageDecodeError, load_image, normalise_size, pil_to_tensor
from unicode_mllm.data.image_policy import ImagePolicy
from unicode_mllm.data.shards import HAS_IMAGE_FIELD
from unicode_mllm.errors import UserError
from unicode_mllm.shard_manifest import read_manifest

logger = logging.getLogger(__name__)

READ_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
LOST_IN_BROKEN_SHARD = "lost in broken shard"
TALLY_ONLY = "__tally_only__"
SKIPS = "__skips__"


@dataclass
class SkipDelta:
    """Skips found by one worker since it last reported: samples per reason, and broken shard names."""

    samples: dict[str, int] = field(default_factory=dict)
    broken_shards: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.samples) or bool(self.broken_shards)

    def merge(self, other: SkipDelta | None) -> SkipDelta:
        """Add `other` into this delta (in place) and return self."""
        if other:
            for reason, n in other.samples.items():
                self.samples[reason] = self.samples.get(reason, 0) + n
            self.broken_shards.extend(other.broken_shards)
        return self


class _WorkerTally:
    """The per-worker accumulator: webdataset handler, per-shard sample counts, pending delta."""

    def __init__(self, expected: Mapping[str, int], strict: bool) -> None:
        self.expected = expected
        self.strict = strict
        self.current_url: str | None = None
        self.assigned: list[str] = []
        self.seen: Counter[str] = Counter()
        self.broken: set[str] = set()
        self.finished: set[str] = set()
        self.pending = SkipDelta()

    def take(self) -> SkipDelta | None:
        delta, self.pending = self.pending, SkipDelta()
        return delta or None

    def track_urls(self, shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # webdataset opens and reads one shard completely before it pulls the next url, so the url
        # last handed out here is the shard that any handler call refers to.
        for shard in shards:
            self.current_url = shard["url"]
            self.assigned.append(shard["url"])
            yield shard

    def handler(self, exn: Exception) -> bool:
        """webdataset handler for the tar-reading stages: count the shard as broken and carry on."""
        url = self.current_url or "<unknown shard>"
        # webdataset appends (stream, url) to exn.args, so str(exn) would be a tuple: take the message part.
        if isinstance(exn, OSError) and exn.strerror:
            detail = exn.strerror
        else:
            detail = str(exn.args[0]).split(" @ ")[0] if exn.args else "no message"  # drop the stream repr
        self.mark_broken(url, f"{type(exn).__name__}: {detail}")
        return True

    def mark_broken(self, url: str, why: str) -> None:
        name = Path(url).name
        if self.strict:
            raise UserError(f"shard {url} is broken ({why}); re-create it, or pass strict=False to count and skip")
        if url not in self.broken:
            self.broken.add(url)
            self.pending.broken_shards.append(name)
            logger.warning("skipping the rest of broken shard %s (%s)", url, why)

    def skip_sample(self, reason: str, message: str) -> None:
        if self.strict:
            raise UserError(f"{message}; pass strict=False to count and skip such samples")
        self.pending.samples[reason] = self.pending.samples.get(reason, 0) + 1
        logger.debug("skipped sample (%s): %s", reason, message)

    def count_samples(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        last: str | None = None
        for sample in samples:
            url = sample.get("__url__", "")
            if url != last:
                if last is not None:
                    self.finish_shard(last)
                last = url
            self.seen[url] += 1
            yield sample

    def finish_shard(self, url: str) -> None:
        if url in self.finished:
            return
        self.finished.add(url)
        expected, seen = self.expected.get(url), self.seen[url]
        if expected is None:
            return
        if seen < expected:
            self.mark_broken(url, f"ends after {seen} of {expected} samples")
            self.pending.samples[LOST_IN_BROKEN_SHARD] = self.pending.samples.get(LOST_IN_BROKEN_SHARD, 0) + (
                expected - seen
            )
        elif seen > expected:
            logger.warning("shard %s holds %d samples but the manifest says %d; is it stale?", url, seen, expected)

    def finish_all(self) -> None:
        for url in self.assigned:
            self.finish_shard(url)


def _has_caption(meta: Mapping[str, Any]) -> bool:
    caption = meta.get("caption")
    return isinstance(caption, str) and bool(caption.strip())


def _take_every(src: Iterable[Any], start: int, step: int) -> Iterator[Any]:
    yield from islice(src, start, None, step)


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamingDataset(IterableDataset):
    """Decoded samples of one split of a shard folder, as a torch IterableDataset.

    Args:
        data_dir: a folder with `manifest.json` (see `unicode_mllm.data.shards`).
        split: which split to read.
        shuffle: shuffle shard order (by seed+epoch, identical on every rank) and samples (a buffer of
            `shuffle_buffer`); False reads the manifest order.
        seed: base seed of both shuffles; `set_epoch` changes them deterministically.
        rank, world_size: this process's share of the shards (default: torch.distributed when
            initialised, else 0 and 1). Shards are split by rank, then by DataLoader worker.
        image_format: "pil" (a PIL image) or "tensor" (float32 (3, h, w) in [-1, 1], needs mode "RGB").
        mode: the decoded pixel mode, "RGB" or "L" (`load_image` converts any other mode).
        image_size: the size ((h, w) or a square side) every yielded image has; None decodes only (any size).
        image_policy: how an image reaches `image_size` (`ImagePolicy`; default `ImagePolicy()`, i.e.
            "auto": exact when the manifest fixes a size, else centre crop). Pass `policy.for_eval()` for
            evaluation: random crops and flips are drawn from (seed, epoch, sample key). Needs image_size.
        expected_size: the older spelling of `image_size` with the "exact" policy: a size mismatch is a
            counted "wrong image size" skip, never a resize. Give it or image_size, not both.
        strict: raise UserError at the first problem instead of counting it.

    Yields dicts {"key": str, "image": PIL | tensor | None (text-only sample), "meta": dict,
    "shard": str, "__skips__": SkipDelta | None}, and possibly one tally record per worker (see the
    module docstring). Iterate through `SkipReport.track` or batch with `collate`.

    With `persistent_workers=True` a DataLoader keeps its first copy of the dataset, so `set_epoch`
    would not reach the workers; use non-persistent workers (the default) to reshuffle per epoch.
    Ranks can receive different numbers of samples when shards do not divide evenly.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        *,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
        image_format: Literal["pil", "tensor"] = "pil",
        mode: Literal["RGB", "L"] = "RGB",
        expected_size: int | tuple[int, int] | None = None,
        image_size: int | tuple[int, int] | None = None,
        image_policy: ImagePolicy | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if image_format not in ("pil", "tensor"):
            raise ValueError(f"image_format {image_format!r} is unknown; choose one of ['pil', 'tensor']")
        if image_format == "tensor" and mode != "RGB":
            raise ValueError(f"image_format='tensor' gives (3, h, w) tensors and needs mode='RGB' (got {mode!r})")
        if shuffle and shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 when shuffle=True, got {shuffle_buffer}")
        if (rank is None) != (world_size is None):
            raise ValueError(f"give both rank and world_size or neither (got rank={rank}, world_size={world_size})")
        if rank is None or world_size is None:
            rank, world_size = _default_rank_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
        if expected_size is not None:
            if image_size is not None:
                raise ValueError("give image_size (with image_policy) or expected_size (exact size), not both")
            if image_policy is not None and image_policy.resize not in ("auto", "exact"):
                raise ValueError(f"expected_size means resize='exact', not {image_policy.resize!r}; use image_size")
            image_size, image_policy = expected_size, ImagePolicy(resize="exact")
        elif image_policy is not None and image_size is None:
            raise ValueError("image_policy needs image_size (the size it brings every image to)")
        self.manifest = read_manifest(data_dir)
        self.split = split
        self.urls = self.manifest.shard_urls(split)
        if not self.urls:
            raise UserError(f"{data_dir}: split {split!r} has no shards; re-run the conversion that writes it")
        self.expected = self.manifest.shard_counts(split)
        self.num_samples = self.manifest.split(split).num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.image_format = image_format
        self.mode = mode
        self.image_size = normalise_size(image_size)  # (h, w) or None: decode only
        self.image_policy: ImagePolicy | None = None
        if self.image_size is not None:
            policy = image_policy or ImagePolicy()
            policy.validate()
            self.image_policy = policy.resolve(self.manifest.image_size())
        # The size a mismatch is a skip for (the "exact" policy), as before image policies existed.
        exact = self.image_policy is not None and self.image_policy.resize == "exact"
        self.expected_size = self.image_size if exact else None
        self.strict = strict
        self.epoch = 0

    @classmethod
    def from_folder(cls, data_dir: str | os.PathLike, split: str, **kwargs: Any) -> StreamingDataset:
        """The constructor, reading as "stream this split of that folder"; unless `image_size` or
        `expected_size` is given, the size is the one the folder's manifest declares (`Manifest.image_size`:
        a shapes set's `image_size`, a converter's `expected_size`): with an `image_policy` it becomes
        `image_size`, else `expected_size`, so an image of another size is a counted "wrong image size"
        skip. A folder that declares none is decoded only (any size)."""
        if "expected_size" not in kwargs and kwargs.get("image_size") is None:
            declared = read_manifest(data_dir).image_size()
            kwargs["image_size" if kwargs.get("image_policy") is not None else "expected_size"] = declared
        return cls(data_dir, split, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (deterministic) shard and sample order the next iteration uses."""
        self.epoch = int(epoch)

    def _decode(self, tally: _WorkerTally, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for raw in samples:
            key = raw.get("__key__", "?")
            shard = Path(raw.get("__url__", "?")).name
            where = f"{shard}:{key}"
            if "json" not in raw:
                tally.skip_sample("missing json", f"{where}: sample has no .json member")
                continue
            try:
                meta = json.loads(raw["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exn:
                tally.skip_sample("bad json", f"{where}.json: not valid UTF-8 JSON ({exn})")
                continue
            if not isinstance(meta, dict):
                tally.skip_sample("bad json", f"{where}.json: holds a {type(meta).__name__}, not an object")
                continue
            if "txt" in raw and not _has_caption(meta):
                try:
                    text = raw["txt"].decode("utf-8").strip()
                except UnicodeDecodeError as exn:
                    tally.skip_sample("bad caption text", f"{where}.txt: caption is not UTF-8 text ({exn})")
                    continue
                if text:
                    meta["caption"] = text
            ext = next((e for e in READ_IMAGE_EXTENSIONS if e in raw), None)
            image: Any = None
            if ext is None:
                if meta.get(HAS_IMAGE_FIELD, True):
                    tally.skip_sample("missing image", f"{where}: sample has no image member")
                    continue
            else:
                name = f"{where}.{ext}"
                try:
                    image = load_image(raw[ext], mode=self.mode, name=name)
                    if self.image_policy is not None and self.image_size is not None:
                        image = self.image_policy.apply(
                            image, self.image_size, seed=self.seed, epoch=self.epoch, key=key, name=name
                        )
                except ImageDecodeError as exn:
                    tally.skip_sample(exn.reason, str(exn))
                    continue
                if self.image_format == "tensor":
                    image = pil_to_tensor(image)
            yield {"key": key, "image": image, "meta": meta, "shard": shard}

    @staticmethod
    def _attach(tally: _WorkerTally, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            sample[SKIPS] = tally.take()
            yield sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        tally = _WorkerTally(self.expected, self.strict)
        num_readers = self.world_size * num_workers
        if len(self.urls) < num_readers and worker == 0:
            logger.warning(
                "%d shards for %d readers (%d ranks x %d workers): some readers get no data; write smaller shards",
                len(self.urls),
                num_readers,
                self.world_size,
                num_workers,
            )
        # String seeds are hashed with sha512 by random.Random, so every process derives the same order.
        shard_seed = f"shards-{self.seed}-{self.epoch}" if self.shuffle else None
        stages: list[Any] = [
            wds.SimpleShardList(self.urls, seed=shard_seed),
            partial(_take_every, start=self.rank, step=self.world_size),  # split by node
            partial(_take_every, start=worker, step=num_workers),  # split by worker
            tally.track_urls,
            wds.tarfile_to_samples(handler=tally.handler),
            tally.count_samples,
        ]
        if self.shuffle:
            rng = random.Random(f"samples-{self.seed}-{self.epoch}-{self.rank}-{worker}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=max(1, self.shuffle_buffer // 10), rng=rng))
        stages += [partial(self._decode, tally), partial(self._attach, tally)]
        yield from wds.DataPipeline(*stages)
        tally.finish_all()
        delta = tally.take()
        if delta:
            yield {TALLY_ONLY: True, SKIPS: delta}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples from `StreamingDataset`: tally records are dropped, their skips kept.

    Returns {"key": list[str], "image": float tensor (b, 3, h, w) when every image is a tensor of one
    shape, else a list (PIL images or None), "meta": list[dict], "shard": list[str],
    "__skips__": SkipDelta | None}. Raises ValueError when tensor images differ in shape.
    """
    delta = SkipDelta()
    real = []
    for sample in samples:
        delta.merge(sample.get(SKIPS))
        if not sample.get(TALLY_ONLY):
            real.append(sample)
    images: Any = [s["image"] for s in real]
    if images and all(isinstance(x, torch.Tensor) for x in images):
        shapes = sorted({tuple(x.shape) for x in images})
        if len(shapes) > 1:
            raise ValueError(f"cannot stack images of different shapes {shapes}; set image_size on the dataset")
        images = torch.stack(images)  # (b, 3, h, w)
    return {
        "key": [s["key"] for s in real],
        "image": images,
        "meta": [s["meta"] for s in real],
        "shard": [s["shard"] for s in real],
        SKIPS: delta or None,
    }


class SkipReport:
    """Sums the skip deltas that samples and batches carry back from the workers.

    `max_skip_fraction`: raise UserError when skipped / (delivered + skipped) exceeds it, checked at
    the end of `track` and, once `check_after` samples were seen, after every update. Use one report
    per epoch (or call `reset`).
    """

    def __init__(
        self, max_skip_fraction: float | None = None, *, check_after: int = 1000, setting: str = "max_skip_fraction"
    ) -> None:
        if max_skip_fraction is not None and not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.max_skip_fraction = max_skip_fraction
        self.check_after = check_after
        self.setting = setting  # the config key or option named in the error, e.g. "data.max_skip_fraction"
        self.reset()

    def reset(self) -> None:
        self.delivered = 0
        self.skipped: Counter[str] = Counter()
        self.broken_shards: list[str] = []

    def add_delta(self, delta: SkipDelta | None) -> None:
        """Sum one worker's skip delta (what a sample's or batch's "__skips__" holds)."""
        if delta:
            self.skipped.update(delta.samples)
            self.broken_shards.extend(delta.broken_shards)

    def add(self, item: Mapping[str, Any]) -> int:
        """Count one yielded sample, tally record or collated batch; returns how many samples it holds."""
        self.add_delta(item.get(SKIPS))
        if item.get(TALLY_ONLY):
            n = 0
        elif isinstance(item.get("key"), list):
            n = len(item["key"])
        else:
            n = 1
        self.delivered += n
        if self.num_total >= self.check_after:
            self.check()
        return n

    def track(self, items: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        """Yield the items that hold samples, updating the report; log the summary and check at the end."""
        for item in items:
            if self.add(item):
                yield item
        logger.info("%s", self.summary())
        self.check()

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def num_total(self) -> int:
        return self.delivered + self.num_skipped

    @property
    def fraction(self) -> float:
        if self.num_total == 0:
            return 1.0 if self.broken_shards else 0.0
        return self.num_skipped / self.num_total

    def summary(self) -> str:
        """One line, e.g. "skipped 3 of 1003 samples (0.30%): 2 corrupt image, 1 bad json; 1 broken shard"."""
        text = f"skipped {self.num_skipped} of {self.num_total} samples ({100 * self.fraction:.2f}%)"
        if self.skipped:
            text += ": " + ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        if self.broken_shards:
            n = len(self.broken_shards)
            shown = ", ".join(self.broken_shards[:3]) + (", ..." if n > 3 else "")
            text += f"; {n} broken shard{'s' if n != 1 else ''} ({shown})"
        return text

    def check(self) -> None:
        """Raise UserError when the skipped fraction exceeds `max_skip_fraction`."""
        if self.max_skip_fraction is not None and self.fraction > self.max_skip_fraction:
            raise UserError(f"{self.summary()}, more than {self._limit()}; {self._fix()}")

    def check_bound(self, total_at_most: int, what: str) -> None:
        """Raise UserError already when the fraction must exceed the limit even if every sample still to come
        (up to `total_at_most` in all, `what` says which) is good: no need to read the rest to know."""
        limit = self.max_skip_fraction
        if limit is not None and self.num_skipped > limit * max(total_at_most, self.num_total):
            raise UserError(f"{self.summary()} so far: already more than {self._limit()} of {what}; {self._fix()}")

    def _limit(self) -> str:
        return f"{self.setting}={self.max_skip_fraction}"

    def _fix(self) -> str:
        return f"repair or remove the bad data ('unicode-mllm data inspect' lists it), or raise {self.setting}"

    def state_dict(self) -> dict[str, Any]:
        """The counts as plain JSON (saved in checkpoints, so a resumed run reports the whole run)."""
        return {"delivered": self.delivered, "skipped": dict(self.skipped), "broken_shards": list(self.broken_shards)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], max_skip_fraction: float | None = None, **kwargs: Any) -> SkipReport:
        """A report holding saved counts (`state_dict`), e.g. to check a whole run's skips at its end."""
        report = cls(max_skip_fraction, **kwargs)
        report.load_state_dict(state)
        return report

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.delivered = int(state.get("delivered", 0))
        self.skipped = Counter(state.get("skipped", {}))
        self.broken_shards = list(state.get("broken_shards", []))
