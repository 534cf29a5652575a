"""Stage-2 micro-batches from shard records: image token ids, the task mixture, samples, padding.

Each micro-batch reads `records_per_batch` records through `EpochBatches` (so its position is
(epoch, record batches taken) and resuming replays the epoch's order exactly), gets every record's
(h, w, d) LLM token ids, either pre-extracted by `unicode-mllm tokenize` (the record JSON's
`visual_token_ids` + `code_shape`) or encoded on the fly by the frozen visual tokenizer, draws the
record's tasks from the `TaskMixture` and builds the samples of whatever kind of record it is
(`data/record_samples.py`: shapes, LLaVA, captions, VQAv2, image folders) with an `MLLMSampleBuilder`. All samples
of the record batch form one group (their number varies with the mixture draws), which the trainer
packs into rows of several samples each (`data.packing`, data/packing.py), or cuts into forward passes of
similar lengths under a padded-token budget (`length_chunks`), so a 518-token decompression sample does not
pad forty 80-token VQA samples.

A record that cannot give a sample (no image, wrong code shape, ids that are not this tokenizer's
codes, too long) is a counted skip with its reason; `SkipCounter.check()` runs as the run goes (after
`TRAINING_CHECK_AFTER` samples) and at every epoch end. `SourceMixture` draws micro-batches from several
shard folders by weight (`data.sources`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from unicode_mllm.data.batches import TRAINING_CHECK_AFTER, DataPosition, EpochBatches
from unicode_mllm.data.mllm_samples import MLLMSample, MLLMSampleBuilder
from unicode_mllm.data.packing import length_chunks_by
from unicode_mllm.data.record_samples import build_record_samples
from unicode_mllm.data.shards import HAS_IMAGE_FIELD
from unicode_mllm.data.stream import StreamingDataset
from unicode_mllm.errors import UserError
from unicode_mllm.stages.mllm.task_mixture import TaskMixture
from unicode_mllm.visual_tokenizer.extract import CODE_SHAPE_KEY, FINGERPRINT_KEY, TOKEN_IDS_KEY
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

logger = logging.getLogger(__name__)

TokenIdSource = Literal["auto", "precomputed", "encode"]

# Skip reasons of records whose token ids cannot be used (one count per record, not per task).
MISSING_TOKEN_IDS = "missing visual_token_ids"
FOREIGN_TOKEN_IDS = "visual_token_ids of another tokenizer"


class RecordTokenIds:
    """(h, w, d) LLM token ids for records: pre-extracted from their JSON or encoded from their images."""

    def __init__(self, visual_tokenizer: VisualTokenizer, source: TokenIdSource = "auto", device: Any = "cpu"):
        if source not in ("auto", "precomputed", "encode"):
            raise ValueError(f"token id source {source!r} is unknown; choose auto, precomputed or encode")
        self.visual_tokenizer = visual_tokenizer
        self.source = source
        self.device = torch.device(device)
        self.code_shape = tuple(visual_tokenizer.code_shape)
        self._fingerprint: str | None = None  # computed on the first pre-extracted record (the tokenizer is frozen)
        self._warned_unfingerprinted = False

    def __call__(self, records: dict[str, Any], builder: MLLMSampleBuilder) -> list[Tensor | None]:
        """The collated records of `collate` -> one (h, w, d) int64 tensor per record, None when unusable
        or text-only (`has_image: false`, which needs no ids and is not a skip).

        Unusable records are counted in `builder.skips` (or raise in strict mode).
        """
        metas: list[dict[str, Any]] = records["meta"]
        out: list[Tensor | None] = [None] * len(metas)
        to_encode: list[int] = []
        for i, meta in enumerate(metas):
            if not meta.get(HAS_IMAGE_FIELD, True):
                continue  # a text-only record (LLaVA's text conversations): no image, no ids
            has_ids = TOKEN_IDS_KEY in meta
            if self.source == "precomputed" or (self.source == "auto" and has_ids):
                out[i] = self._precomputed(meta, builder)
            else:
                to_encode.append(i)
        if to_encode:
            images = records["image"]
            if not isinstance(images, Tensor):  # a batch mixing text-only records: stack the images it has
                missing = [metas[i].get("id", "?") for i in to_encode if images[i] is None]
                if missing:
                    raise UserError(
                        f"records {missing[:3]} have no image to encode; pre-extract codes with "
                        "'unicode-mllm tokenize' or fix the shards"
                    )
                images = torch.stack([images[i] for i in to_encode])
                to_encode_rows = list(range(len(to_encode)))
            else:
                to_encode_rows = to_encode
            pixel_values = images[to_encode_rows].to(self.device)  # (k, 3, H, W) in [-1, 1]
            with torch.no_grad():
                token_ids = self.visual_tokenizer.codes_to_token_ids(self.visual_tokenizer.encode(pixel_values))
            for row, i in enumerate(to_encode):
                out[i] = token_ids[row].cpu()
        return out

    def _precomputed(self, meta: dict[str, Any], builder: MLLMSampleBuilder) -> Tensor | None:
        sample_id = str(meta.get("id", "?"))
        if TOKEN_IDS_KEY not in meta:
            builder.skips.skip(
                MISSING_TOKEN_IDS,
                f"sample {sample_id}: no {TOKEN_IDS_KEY} in its JSON; run 'unicode-mllm tokenize' or set "
                "data.token_ids=encode",
            )
            return None
        shape = tuple(meta.get(CODE_SHAPE_KEY, ()))
        if shape != self.code_shape:
            builder.skips.skip(
                FOREIGN_TOKEN_IDS,
                f"sample {sample_id}: pre-extracted code shape {shape} is not the visual tokenizer's "
                f"{self.code_shape}; "
                "re-run 'unicode-mllm tokenize' with this tokenizer",
            )
            return None
        if not self._same_tokenizer(meta, builder, sample_id):
            return None
        ids = torch.tensor(meta[TOKEN_IDS_KEY], dtype=torch.long)
        if ids.numel() != self.code_shape[0] * self.code_shape[1] * self.code_shape[2] or not bool(
            self.visual_tokenizer.is_code_token_id(ids).all()
        ):
            builder.skips.skip(
                FOREIGN_TOKEN_IDS,
                f"sample {sample_id}: pre-extracted ids are not codes of this visual tokenizer; re-run "
                "'unicode-mllm tokenize' with it",
            )
            return None
        return ids.reshape(self.code_shape)

    def _same_tokenizer(self, meta: dict[str, Any], builder: MLLMSampleBuilder, sample_id: str) -> bool:
        # Ids of another tokenizer with the same code shape are valid code ids but mean other images.
        if self._fingerprint is None:
            self._fingerprint = self.visual_tokenizer.encoding_fingerprint()
        written_by = meta.get(FINGERPRINT_KEY)
        if written_by is None:
            if not self._warned_unfingerprinted:
                logger.warning(
                    "sample %s: pre-extracted ids carry no %s, so they cannot be checked against this visual "
                    "tokenizer; re-run 'unicode-mllm tokenize' with it (or set data.token_ids=encode)",
                    sample_id,
                    FINGERPRINT_KEY,
                )
                self._warned_unfingerprinted = True
            return True
        if written_by != self._fingerprint:
            builder.skips.skip(
                FOREIGN_TOKEN_IDS,
                f"sample {sample_id}: pre-extracted ids were written by visual tokenizer {written_by}, not by this "
                f"one ({self._fingerprint}); re-run 'unicode-mllm tokenize' with it or set data.token_ids=encode",
            )
            return False
        return True


class MLLMBatches:
    """Endless lists of stage-2 samples (those of `records_per_batch` records each) from one shard split;
    `position` resumes it. `length_chunks` cuts a list into forward passes of similar lengths.

    The builder's skip fraction is checked as the run goes, once `check_after` samples were built or
    skipped (a short run that skips a quarter of its samples fails, not only one that reaches an epoch end),
    and at every epoch end.
    """

    def __init__(
        self,
        dataset: StreamingDataset,
        builder: MLLMSampleBuilder,
        token_ids: RecordTokenIds,
        mixture: TaskMixture,
        *,
        records_per_batch: int,
        vqa_turns: int = 0,
        num_workers: int = 0,
        max_skip_fraction: float | None = None,
        position: DataPosition | None = None,
        source: str = "",
        check_after: int = TRAINING_CHECK_AFTER,
    ):
        self.records = EpochBatches(
            dataset,
            records_per_batch,
            num_workers=num_workers,
            max_skip_fraction=max_skip_fraction,
            position=position,
            check_after=check_after,
        )
        self.builder = builder
        self.token_ids = token_ids
        self.mixture = mixture
        self.vqa_turns = vqa_turns
        self.source = source
        self.check_after = check_after

    @property
    def position(self) -> DataPosition:
        return self.records.position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.records.position.epoch
        produced = self.records.position.batch  # a resumed epoch already gave this many batches
        weighted = [task for task, weight in self.mixture.weights.items() if weight > 0]
        for records in self.records:
            if self.records.position.epoch != epoch:  # an epoch ended: check the samples that failed to build
                self.builder.skips.check()
                if produced == 0:
                    raise UserError(f"an epoch of the stage-2 data gave no sample ({self.builder.skips.summary()})")
                epoch, produced = self.records.position.epoch, 0
            samples: list[MLLMSample] = []
            self.builder.skips.source = self.source
            token_ids = self.token_ids(records, self.builder)
            for meta, key, ids in zip(records["meta"], records["key"], token_ids, strict=True):
                if ids is None and meta.get(HAS_IMAGE_FIELD, True):
                    continue  # counted once for the record by `token_ids`
                plan = self.mixture.plan(key, epoch)
                rng = random.Random(f"vqa-turns-{self.mixture.seed}-{epoch}-{key}")
                samples += build_record_samples(
                    self.builder,
                    meta,
                    ids,
                    plan.tasks,
                    drop_prompt=plan.drop_prompt,
                    vqa_turns=self.vqa_turns,
                    rng=rng,
                    weighted_tasks=weighted,
                )
            self.builder.skips.check(at_least=self.check_after)
            if samples:
                produced += 1
                yield samples


class SourceMixture:
    """Endless stage-2 sample lists drawn from several sources by weight (`data.sources`).

    Each micro-batch comes whole from one source, chosen by an RNG keyed by (seed, draw number), so the
    sequence of sources is a function of the draw count: resuming restores every source's own position and
    the count, and replays the run exactly. One source is always chosen without a draw.
    """

    def __init__(self, streams: Mapping[str, MLLMBatches], weights: Mapping[str, float], seed: int, draws: int = 0):
        if set(streams) != set(weights):
            raise ValueError(f"sources {sorted(streams)} and weights {sorted(weights)} differ")
        self.streams = dict(streams)
        self.names = list(streams)
        self.weights = [float(weights[name]) for name in self.names]
        if sum(self.weights) <= 0:
            raise ValueError(f"every source weight is 0: {dict(weights)}")
        self.seed = seed
        self.draws = draws

    def choose(self, draw: int) -> str:
        if len(self.names) == 1:
            return self.names[0]
        return random.Random(f"source-{self.seed}-{draw}").choices(self.names, weights=self.weights)[0]

    def position(self) -> dict[str, Any]:
        """JSON: the draw count and each source's (epoch, batch)."""
        return {"draws": self.draws, "sources": {n: s.position.to_dict() for n, s in self.streams.items()}}

    def __iter__(self) -> Iterator[tuple[str, list[MLLMSample]]]:
        iterators = {name: iter(stream) for name, stream in self.streams.items()}
        while True:
            name = self.choose(self.draws)
            samples = next(iterators[name])
            self.draws += 1
            yield name, samples


def length_chunks(samples: list[MLLMSample], max_tokens: int) -> list[list[MLLMSample]]:
    """Samples sorted by length (longest first) and cut so that len(chunk) * longest <= max_tokens.

    A sample longer than `max_tokens` gets a chunk of its own. Order is deterministic (stable sort).
    """
    return length_chunks_by(samples, max_tokens, len)
