"""Sequence packing: several samples per row, each with its own positions and attention block.

A packed row is the concatenation of whole samples followed by padding. `position_ids` restart at 0 at every
sample (padding slots get 0: each is a one-token block of its own), and the LM is called with these positions
and *no* 2D attention mask: transformers (>= 4.54, the masking_utils of 5.x) then reads the sequence
boundaries from the restarting positions (`find_packed_sequence_indices`) and builds a block-diagonal causal
mask for the sdpa/eager/flex paths, or cu_seqlens for flash-attention varlen. A sample therefore never attends
to another and sees the positions it would have alone. `packing_problem` checks that numerically on the
actual LM before training trusts it (an architecture whose mask builder ignores the positions would otherwise
silently let samples attend to each other).

Rows are filled first-fit-decreasing at the row capacity that pads least, then cut into forward passes under the
same padded-token budget as `length_chunks`: a pure function of the samples, so resuming replays the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unicode_mllm.constants import IGNORE_INDEX
from unicode_mllm.data.mllm_samples import MLLMSample, image_fields

# A forward pass: rows, each the samples it holds (one sample a row when not packing).
Rows = list[list[MLLMSample]]


def pack_rows(samples: Sequence[Any], capacity: int) -> list[list[Any]]:
    """First-fit decreasing: samples (anything with len) -> rows of total length <= capacity.

    Longest first, each into the first row with room (stable: equal lengths keep their order). A sample
    longer than `capacity` gets a row of its own.
    """
    rows: list[list[Any]] = []
    free: list[int] = []  # room left in each row
    for sample in sorted(samples, key=len, reverse=True):
        n = len(sample)
        for i, room in enumerate(free):
            if n <= room:
                rows[i].append(sample)
                free[i] -= n
                break
        else:
            rows.append([sample])
            free.append(capacity - n)
    return rows


def row_length(row: Sequence[Any]) -> int:
    return sum(len(s) for s in row)


def length_chunks_by(items: Sequence[Any], max_tokens: int, size: Callable[[Any], int]) -> list[list[Any]]:
    """Items sorted by `size` (largest first, stable) and cut so that len(chunk) * largest <= max_tokens; an item
    larger than `max_tokens` is a chunk of its own. Samples (size = len) or packed rows (size = row_length)."""
    ordered = sorted(items, key=size, reverse=True)
    chunks: list[list[Any]] = []
    for item in ordered:
        if chunks and (len(chunks[-1]) + 1) * size(chunks[-1][0]) <= max_tokens:
            chunks[-1].append(item)
        else:
            chunks.append([item])
    return chunks


def row_chunks(rows: Sequence[list[Any]], max_tokens: int) -> list[list[list[Any]]]:
    """Packed rows cut into forward passes under the padded-token budget of `length_chunks`."""
    return length_chunks_by(rows, max_tokens, row_length)


def padded_tokens(chunks: Sequence[Sequence[Sequence[Any]]]) -> int:
    """Slots the forward passes compute: rows x longest row, per pass (rows come longest first)."""
    return sum(len(chunk) * row_length(chunk[0]) for chunk in chunks)


# Row capacities tried per group: every length from the longest sample up to the cap, thinned to this many.
CAPACITY_CANDIDATES = 64


def packed_chunks(samples: Sequence[MLLMSample], max_tokens: int, row_capacity: int) -> list[Rows]:
    """One group's samples -> forward passes of packed rows, with the fewest padded slots.

    A pass pads its rows to its longest, and with ~100-token samples a fixed capacity leaves rows a few dozen
    tokens short of it (the tiny preset: 5% padding at 640), so the capacity is chosen per group among lengths
    from the longest sample to max(row_capacity, longest sample): the one that pads least, the shortest of
    equals (less attention work). Rows are therefore never longer than `row_capacity` (the sample length cap),
    except for one longer sample alone: no attention block grows beyond unpacked training's. Deterministic.
    """
    if not samples:
        return []
    longest = max(len(s) for s in samples)
    cap = max(row_capacity, longest)
    step = max(1, -(-(cap - longest) // CAPACITY_CANDIDATES))
    best: list[Rows] = []
    for capacity in sorted({*range(longest, cap + 1, step), cap}):
        chunks = row_chunks(pack_rows(samples, capacity), max_tokens)
        if not best or padded_tokens(chunks) < padded_tokens(best):
            best = chunks
    return best


@dataclass(frozen=True)
class PackedCollator:
    """Right-padded rows of packed `MLLMSample`s.

    Returns the keys of `MLLMCollator` (input_ids, attention_mask, labels (b, t); image_token_ids (n, h, w, d)
    in row order then sample order, which is splice order; images_per_sample (b,) images per *row*;
    image_is_uncompressed (n,)), plus
        position_ids: (b, t) long, 0.. within each sample, 0 on padding;
        sample_index: (b, t) long, the index in `samples` of each slot's sample, -1 on padding;
        samples: the k samples in flat order (row by row); tasks, sample_ids: (k,) lists in that order.
    The first label of every sample is IGNORE_INDEX: it would be the target of the previous sample's last token.
    """

    pad_token_id: int

    def __call__(self, rows: Sequence[Sequence[MLLMSample]]) -> dict[str, Any]:
        if not rows or not all(rows):
            raise ValueError("cannot collate an empty batch or an empty row")
        length = max(row_length(row) for row in rows)
        b = len(rows)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        position_ids = torch.zeros((b, length), dtype=torch.long)
        sample_index = torch.full((b, length), -1, dtype=torch.long)
        flat: list[MLLMSample] = []
        for r, row in enumerate(rows):
            start = 0
            for sample in row:
                n = len(sample)
                cols = slice(start, start + n)
                input_ids[r, cols] = sample.input_ids
                labels[r, cols] = sample.labels
                labels[r, start] = IGNORE_INDEX
                attention_mask[r, cols] = 1
                position_ids[r, cols] = torch.arange(n)
                sample_index[r, cols] = len(flat)
                flat.append(sample)
                start += n
        images_per_row = [sum(s.image_token_ids.shape[0] for s in row) for row in rows]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "position_ids": position_ids,
            "sample_index": sample_index,
            "samples": flat,
            **image_fields(flat, images_per_row),
        }


def sample_losses(losses: Tensor, mask: Tensor, sample_index: Tensor, num_samples: int) -> tuple[Tensor, Tensor]:
    """Token losses of a (packed or not) batch summed per sample.

    losses, mask: (b, t-1) next-token losses and target mask (`token_losses`); sample_index: (b, t) the sample of
    each slot (-1 padding). A target at slot j+1 belongs to the sample of slot j+1. Returns (k,) loss sums and
    (k,) labelled-token counts.
    """
    owner = sample_index[:, 1:].to(losses.device)  # (b, t-1)
    keep = mask & (owner >= 0)
    sums = losses.new_zeros(num_samples).index_add(0, owner[keep], losses[keep])
    counts = torch.zeros(num_samples, dtype=torch.long, device=losses.device).index_add(
        0, owner[keep], torch.ones_like(owner[keep])
    )
    return sums, counts


@torch.no_grad()
def packing_problem(
    model: Any,
    vocab_size: int,
    device: Any,
    *,
    lengths: tuple[int, ...] = (5, 7, 4),
    seed: int = 0,
    **forward_kwargs: Any,
) -> str | None:
    """None when `model` treats a packed row as separate samples; otherwise why not, in a few words.

    model: called as `model(input_ids=(1, t), position_ids=(1, t) or absent, **forward_kwargs).logits`, as the
    training forward calls it: a causal LM with use_cache=False (transformers reads packing from the positions
    only without a cache), or the (possibly DDP/FSDP-wrapped) `UniCodeMLLM`, so that a sharded model runs its
    own collectives.
    Runs a row of three random samples (padded by two slots) once packed and each alone, in eval mode, and
    compares the logits of every sample's tokens. Costs four forwards over a few tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    samples = [torch.randint(0, vocab_size, (n,), generator=generator).to(device) for n in lengths]
    total = sum(lengths)
    pad = torch.zeros(2, dtype=torch.long, device=device)
    ids = torch.cat([*samples, pad]).unsqueeze(0)  # (1, total + 2)
    positions = torch.cat([torch.arange(n) for n in (*lengths, 1, 1)]).unsqueeze(0).to(device)  # (1, total + 2)
    was_training = model.training
    model.eval()
    try:
        packed = model(input_ids=ids, position_ids=positions, **forward_kwargs).logits[0, :total].float()
        alone = torch.cat([model(input_ids=s.unsqueeze(0), **forward_kwargs).logits[0].float() for s in samples])
    except Exception as error:  # a model whose forward refuses the arguments cannot pack
        return f"failed on a packed row ({type(error).__name__}: {str(error)[:160]})"
    finally:
        model.train(was_training)
    low_precision = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
    tolerance = 5e-2 if low_precision else 1e-4
    error = float((packed - alone).abs().max() / alone.abs().max().clamp_min(1e-6))
    if not error <= tolerance:
        return (
            f"gives packed-row logits {error:.2g} (relative) away from the samples' own (tolerance {tolerance:g}): "
            "its attention does not keep samples apart by their restarting position_ids"
        )
    return None
