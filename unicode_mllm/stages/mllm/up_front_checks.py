"""Stage-2 checks before the models train a step: every split a source needs exists, and the sequences the
templates can produce fit `data.max_length` and the LM's positions.

Without them a run fails late or, worse, trains wrongly: an eval split missing from the shards fails at the
first evaluation with the steps before it lost; a `data.max_length` beyond the LM's position table is an
IndexError (learned positions, GPT-2) or silent training past the positions the LM was trained for (RoPE),
after which `generate` refuses the model; a text-to-image sample longer than `data.max_length` makes every
one of them a skip.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from unicode_mllm.data.image_policy import ImagePolicy, check_fixed_size
from unicode_mllm.data.mllm_samples import MLLMSampleBuilder
from unicode_mllm.errors import UserError
from unicode_mllm.generation.prompts import max_positions
from unicode_mllm.shard_manifest import read_manifest
from unicode_mllm.stages.mllm.task_mixture import TaskMixture

if TYPE_CHECKING:
    from unicode_mllm.stages.mllm.config import DataSource, MLLMDataConfig


def check_sources(
    sources: Collection[DataSource], eval_splits: Sequence[str], policy: ImagePolicy, image_size: int
) -> None:
    """Each source's training split is in its folder; each eval split is in at least one source's folder; a
    folder of fixed-size images (shapes) has the tokenizer's size unless the policy may resize."""
    held: dict[str, list[str]] = {}  # manifest location -> its splits
    for source in sources:
        manifest = read_manifest(source.shards)
        held[manifest.location] = sorted(manifest.splits)
        check_fixed_size(
            policy,
            manifest.image_size(),
            image_size,
            shards_key=f"data source {source.name} ({source.shards})",
            size_key="the visual tokenizer's image_size",
        )
        if source.train_split not in manifest.splits:
            raise UserError(
                f"data source {source.name}: {manifest.location} has no split {source.train_split!r}, only "
                f"{sorted(manifest.splits)}; write that split or set its train_split (data.train_split)"
            )
    for split in eval_splits:
        if not any(split in splits for splits in held.values()):
            where = "; ".join(f"{location} has only {splits}" for location, splits in held.items())
            raise UserError(
                f"eval.splits names split {split!r}, but {where}; write that split into a data source or set "
                "eval.splits to splits they hold (--set 'eval.splits=[]' evaluates nothing)"
            )


def check_sequence_lengths(
    builder: MLLMSampleBuilder, mllm: Any, data: MLLMDataConfig, mixtures: Iterable[TaskMixture]
) -> None:
    """`data.max_length` within the LM's positions, and every weighted task's shortest sample within it."""
    limit = max_positions(mllm.lm)
    if limit is not None and data.max_length > limit:
        raise UserError(
            f"data.max_length={data.max_length} exceeds the {limit} positions the LM attends over "
            f"(its config's position limit); set data.max_length={limit} or less, or use an LM with more positions"
        )
    weighted = {task for mixture in mixtures for task, weight in mixture.weights.items() if weight > 0}
    for task in sorted(weighted):
        shortest = builder.shortest_length(task)
        if shortest > data.max_length:
            h, w, d = builder.code_shape
            room = f" (the LM has {limit} positions)" if limit is not None else ""
            raise UserError(
                f"every {task} sample is at least {shortest} tokens with this template and a {h}x{w}x{d} code "
                f"grid, more than data.max_length={data.max_length}, so all would be skipped; raise "
                f"data.max_length to {shortest} or more{room}, or set that task's weight to 0"
            )
