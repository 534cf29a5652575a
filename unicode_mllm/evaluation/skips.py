"""Counted, named skips for the evaluators (an input that cannot be used is never dropped silently)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

logger = logging.getLogger(__name__)

MAX_NAMES_PER_REASON = 20  # names kept per reason in reports; the counts are always complete
TEXT_ONLY = "text-only sample"


class SkipCounts:
    """Skipped inputs counted by reason, with the first few names of each reason."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.names: dict[str, list[str]] = {}
        self.broken_shards: list[str] = []

    def skip(self, reason: str, name: str, message: str | None = None) -> None:
        self.counts[reason] += 1
        names = self.names.setdefault(reason, [])
        if len(names) < MAX_NAMES_PER_REASON:
            names.append(name)
        logger.warning("skipping %s", message or f"{name} ({reason})")

    def add_counts(self, counts: dict[str, int], broken_shards: Sequence[str] = ()) -> None:
        """Merge counts that come without names (e.g. a shard stream's `SkipReport`)."""
        self.counts.update(counts)
        self.broken_shards.extend(broken_shards)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """e.g. "skipped 2: 1 corrupt image (bad.png), 1 missing image (gone.jpg)" or "skipped 0"."""
        if not self.counts and not self.broken_shards:
            return "skipped 0"
        parts = []
        for reason, n in self.counts.most_common():
            shown = self.names.get(reason, [])
            names = f" ({', '.join(shown[:3])}{', ...' if n > 3 else ''})" if shown else ""
            parts.append(f"{n} {reason}{names}")
        text = f"skipped {self.total}: " + ", ".join(parts)
        if self.broken_shards:
            text += f"; broken shards: {', '.join(self.broken_shards)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_reason": dict(self.counts),
            "names": {reason: list(names) for reason, names in self.names.items()},
            "broken_shards": list(self.broken_shards),
        }


def shard_images(stream: Iterable[dict[str, Any]], skips: SkipCounts) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, sample) of each sample of a shard stream (`data.stream.StreamingDataset`) that has an image; the
    stream's own skips and the text-only samples are counted in `skips`."""
    from unicode_mllm.data.stream import SkipReport

    report = SkipReport()
    try:
        for sample in stream:
            if not report.add(sample):  # a tally record: skips only
                continue
            name = f"{sample['shard']}:{sample['key']}"
            if sample["image"] is None:
                skips.skip(TEXT_ONLY, name)
                continue
            yield name, sample
    finally:
        # Counted even when the consumer stops early (a limit or count reached): what was read so far is reported.
        skips.add_counts(dict(report.skipped), report.broken_shards)
