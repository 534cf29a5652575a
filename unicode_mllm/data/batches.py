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
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.position = position or DataPosition()
        self.report = SkipReport(max_skip_fraction)

    def _loader(self) -> DataLoader:
        self.dataset.set_epoch(self.position.epoch)
        return DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            skip, produced = self.position.batch, 0
            for batch in self._loader():
                self.report.add_delta(batch.get("__skips__"))
                if not batch["key"]:
                    continue  # only skip tallies came through
                produced += 1
                if produced <= skip:
                    continue  # replaying the epoch up to the resume point
                self.position.batch = produced
                yield batch
            if produced == 0:
                raise UserError(
                    f"split {self.dataset.split!r} yielded no usable samples ({self.report.summary()}); "
                    "check the shards with 'unicode-mllm data inspect'"
                )
            self.report.check()
            self.position = DataPosition(self.position.epoch + 1, 0)
