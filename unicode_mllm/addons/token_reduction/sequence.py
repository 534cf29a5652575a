"""`ReducedSequence`: the prompt the LM reads after a vision-stage reduction, with its position ids.

The splice (`splice.py`) always lays out h*w slots per image, so labels and masks built by the
collators stay aligned. A reduction then keeps, for each image, only the slots of its surviving tokens
(`ReducedImageTokens.src_index`), writes the reduced embeddings there, and removes the other slots; rows
are re-packed with **left padding** (what batched generation needs; `image_tokens.compact_rows`).

Position policy:
- `keep_original`: every surviving token keeps the RoPE position its slot had in the unreduced prompt
  (text after the image too), and generation continues from the unreduced length, so the LM sees the same
  geometry as without reduction, only with holes;
- `renumber`: positions are 0..n-1 over the surviving real tokens, and generation continues from n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from unicode_mllm.addons.token_reduction.config import PositionPolicy
from unicode_mllm.addons.token_reduction.image_tokens import (
    ReducedImageTokens,
    compact_rows,
    gather_rows,
    slots_of_cells,
)
from unicode_mllm.constants import IMAGE_PLACEHOLDER_ID
from unicode_mllm.splice import SplicedInputs, position_ids_from_attention_mask

POSITION_POLICIES: tuple[str, ...] = ("keep_original", "renumber")


@dataclass
class ReducedSequence:
    """LM input after reduction (t' = the longest reduced row; rows are left-padded).

    inputs_embeds: (b, t', c); attention_mask: (b, t') long, 1 = real token; position_ids: (b, t') long
    (padding slots hold 1, as in the splice); is_image: (b, t') bool; token_sizes: (b, t') fp32, how many
    original tokens each slot stands for (1 for text, 0 on padding); source_index: (b, t') long, the column
    of the unreduced prompt each slot came from (-1 on padding); next_position: (b,) long, the position the
    first generated token takes.
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    is_image: Tensor
    token_sizes: Tensor
    source_index: Tensor
    next_position: Tensor

    @property
    def num_image_tokens(self) -> Tensor:
        """(b,) long: image tokens per row."""
        return self.is_image.sum(dim=-1)


def check_position_policy(policy: str) -> None:
    if policy not in POSITION_POLICIES:
        raise ValueError(f"position_policy {policy!r} is unknown; choose one of {list(POSITION_POLICIES)}")


def sequence_from_embeds(
    inputs_embeds: Tensor, attention_mask: Tensor, is_image: Tensor, position_ids: Tensor | None = None
) -> ReducedSequence:
    """Wrap an unreduced (b, t, c) input (left or right padded) as a `ReducedSequence`, re-packed to the left.

    attention_mask: (b, t), 1 = real; is_image: (b, t) bool; position_ids: (b, t), default counts real tokens.
    Raises ValueError when shapes differ or an image slot sits on padding.
    """
    b, t, _ = inputs_embeds.shape
    if attention_mask.shape != (b, t) or is_image.shape != (b, t):
        raise ValueError(
            f"inputs_embeds {tuple(inputs_embeds.shape)}, attention_mask {tuple(attention_mask.shape)} and "
            f"is_image {tuple(is_image.shape)} disagree"
        )
    valid = attention_mask.bool()
    if bool((is_image & ~valid).any()):
        raise ValueError("an image slot sits on padding (attention_mask 0)")
    if position_ids is None:
        position_ids = position_ids_from_attention_mask(attention_mask)
    index, new_valid = compact_rows(valid)
    positions = gather_rows(position_ids, index, fill=1)
    next_position = (position_ids.masked_fill(~valid, -1).amax(dim=-1) + 1).clamp(min=0)
    return ReducedSequence(
        inputs_embeds=gather_rows(inputs_embeds, index),
        attention_mask=new_valid.long(),
        position_ids=positions,
        is_image=gather_rows(is_image, index, fill=False),
        token_sizes=new_valid.float(),
        source_index=index,
        next_position=next_position,
    )


def apply_image_reduction(
    input_ids: Tensor, spliced: SplicedInputs, reduced: ReducedImageTokens, *, position_policy: PositionPolicy
) -> ReducedSequence:
    """Drop the removed image slots of a spliced prompt and write the reduced embeddings into the kept ones.

    input_ids: (b, t) with IMAGE_PLACEHOLDER_ID spans of h*w slots per image (the splice's input);
    spliced: its `SplicedInputs` (inputs_embeds (b, t, c), attention_mask, position_ids);
    reduced: the n images of the batch in splice order (row 0's images first), grid h*w.
    Raises ValueError when the placeholders do not hold n * h*w slots or the policy is unknown.
    """
    check_position_policy(position_policy)
    reduced.check()
    h, w = reduced.grid_hw
    cells = h * w
    n = reduced.tokens.shape[0]
    is_image = input_ids == IMAGE_PLACEHOLDER_ID  # (b, t)
    if int(is_image.sum()) != n * cells:
        raise ValueError(f"{int(is_image.sum())} image placeholders but {n} reduced images of {h}x{w} = {cells} slots")
    if n == 0:
        return sequence_from_embeds(spliced.inputs_embeds, spliced.attention_mask, is_image, spliced.position_ids)
    slot_id = (is_image.flatten().long().cumsum(0) - 1).view_as(input_ids).clamp(min=0)  # (b, t), splice order
    image_of, cell_of = slot_id // cells, slot_id % cells  # (b, t) each; only read on image slots
    slot_of_cell = slots_of_cells(reduced.src_index, cells)  # (n, h*w); src_index >= 0 exactly on mask (checked)
    image_of = image_of.clamp(max=n - 1)
    slot = torch.where(is_image, slot_of_cell[image_of, cell_of], -1)  # (b, t): reduced slot, -1 = removed

    valid = spliced.attention_mask.bool()
    kept_image = is_image & (slot >= 0)
    safe = slot.clamp(min=0)
    new_embeds = reduced.tokens[image_of, safe].to(spliced.inputs_embeds.dtype)  # (b, t, c)
    embeds = torch.where(kept_image[..., None], new_embeds, spliced.inputs_embeds)
    sizes = torch.where(kept_image, reduced.sizes[image_of, safe].float(), valid.float())
    keep = (valid & ~is_image) | kept_image
    index, new_valid = compact_rows(keep)
    if position_policy == "keep_original":
        positions = gather_rows(spliced.position_ids, index, fill=1)
        next_position = (spliced.position_ids.masked_fill(~valid, -1).amax(dim=-1) + 1).clamp(min=0)
    else:
        positions = position_ids_from_attention_mask(new_valid.long())
        next_position = new_valid.sum(dim=-1)
    return ReducedSequence(
        inputs_embeds=gather_rows(embeds, index),
        attention_mask=new_valid.long(),
        position_ids=positions,
        is_image=gather_rows(kept_image, index, fill=False),
        token_sizes=gather_rows(sizes, index),
        source_index=index,
        next_position=next_position,
    )
