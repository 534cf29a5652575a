"""An endless, resumable stream of batches over epochs of a `StreamingDataset`.

The position is (epoch, batches taken in that epoch). Shuffling is a function of (seed, epoch, rank,
worker), so resuming at a position replays the epoch's order and skips the batches already seen:
exact resume without storing the stream itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from unicode_mllm.data.stream import SkipReport, StreamingDataset, collate
from unicode_mllm.errors import UserError

# Samples read before a trainer's max_skip_fraction is checked as the run goes: a short run that skips a
# fifth of its data must fail too, not only one that reaches an epoch's end.
TRAINING_CHECK_AFTER = 100


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}


class EpochBatches:
    """Yields collated batches forever; `position` says where the next batch comes from."""

    def __init__(
        self,
        dataset: StreamingDataset,
        batch_size: int,
        *,
        num_workers: int = 0,
        max_skip_fraction: float | None = None,
        position: DataPosition | None = None,
        check_after: int = TRAINING_CHECK_AFTER,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.position = position or DataPosition()
        # Reader-level skips (corrupt images, broken shards): counted over the whole run, checked per epoch.
        # checked after every batch once `check_after` samples were seen, and at every epoch end.
        self.report = SkipReport(max_skip_fraction, check_after=check_after, setting="data.max_skip_fraction")

    def _what(self) -> str:
        return f"the {self.dataset.num_samples} samples of split {self.dataset.split!r}"

    def _loader(self) -> DataLoader:
        self.dataset.set_epoch(self.position.epoch)
        return DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            skip, produced = self.position.batch, 0
            epoch_start = self.report.num_total
            for batch in self._loader():
                produced += 1 if batch["key"] else 0  # a batch without keys carries only skip tallies
                if produced <= skip and (batch["key"] or produced < skip):
                    continue  # replaying the epoch up to the resume point: counted before the checkpoint
                self.report.add(batch)
                # The epoch holds at most the split's samples: fail at once when even that cannot save it.
                self.report.check_bound(epoch_start + self.dataset.num_samples, self._what())
                if batch["key"]:
                    self.position.batch = produced
                    yield batch
            if produced == 0:
                raise UserError(
                    f"split {self.dataset.split!r} yielded no usable samples ({self.report.summary()}); "
                    "check the shards with 'unicode-mllm data inspect'"
                )
            self.report.check()
            self.position = DataPosition(self.position.epoch + 1, 0)
