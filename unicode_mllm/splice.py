"""The image-embedding splice: input ids with image placeholder spans -> `inputs_embeds` for the LM.

A sample reserves one span of `tokens_per_image` consecutive `IMAGE_PLACEHOLDER_ID`s per image it reads
(`h*w` for aggregated reading, `h*w*d` for interleaved, or a compressor's `num_output_tokens(h, w)`; the
sample builders lay the spans out), so the splice never changes sequence lengths: labels, attention
masks and padding made by the collator stay aligned. Images of one batch may take spans of different
lengths (a compressed read next to a decompression sample's full grid): pass their embeddings as a list
of (s_i, c) tensors. The placeholder is negative, so it is swapped for the pad id before the embedding
lookup and the image embeddings are then written over those slots with one boolean-mask assignment.

After deepseek-ai/Janus (`modeling_vlm.py`, `prepare_inputs_embeds`): one `masked_scatter`, but here
the count invariant is checked, and the caller's tensors are never edited.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unicode_mllm.constants import IMAGE_PLACEHOLDER_ID


@dataclass
class SplicedInputs:
    """inputs_embeds: (b, t, c); attention_mask: (b, t) long, 1 = real token; position_ids: (b, t) long."""

    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor


def position_ids_from_attention_mask(attention_mask: Tensor) -> Tensor:
    """(b, t) mask -> (b, t) positions counting real tokens only, so left padding does not shift them.

    Padding slots get position 1 (any valid value works, they are masked out); this is the rule HF's
    `generate` uses, so a left-padded prompt gets the positions it would have alone.
    """
    mask = attention_mask.long()
    return (mask.cumsum(dim=-1) - 1).masked_fill(mask == 0, 1)


def image_counts(input_ids: Tensor, tokens_per_image: int) -> Tensor:
    """(b, t) ids -> (b,) number of images each row reads. Raises ValueError if a row's span is partial."""
    per_row = (input_ids == IMAGE_PLACEHOLDER_ID).sum(dim=-1)  # (b,)
    partial = per_row % tokens_per_image != 0
    if bool(partial.any()):
        row = int(partial.nonzero()[0, 0])
        raise ValueError(
            f"row {row} has {int(per_row[row])} image placeholders, not a multiple of the "
            f"{tokens_per_image} slots one image takes"
        )
    return per_row // tokens_per_image


def _check_whole_spans(is_image: Tensor, tokens_per_image: int) -> None:
    """Every run of consecutive placeholders must hold whole images (a multiple of s slots)."""
    edges = torch.nn.functional.pad(is_image.long(), (1, 1)).flatten().diff()  # rows padded: runs never join
    starts, ends = (edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0]
    lengths = ends - starts  # (runs,)
    partial = lengths % tokens_per_image != 0
    if bool(partial.any()):
        t = is_image.shape[1] + 2
        first = int(partial.nonzero()[0, 0])
        raise ValueError(
            f"row {int(starts[first]) // t} has a run of {int(lengths[first])} image placeholders at position "
            f"{int(starts[first]) % t}, not a multiple of the {tokens_per_image} slots one image takes"
        )


def _image_ends_per_row(is_image: Tensor, lengths: Tensor) -> Tensor:
    """(b, t) placeholder mask + (n,) span lengths in splice order -> (b,) images whose span ends in each row."""
    row_ends = is_image.sum(dim=-1).cumsum(0)  # (b,) slots up to and including each row
    image_ends = lengths.to(row_ends.device).cumsum(0)  # (n,)
    return torch.diff(torch.searchsorted(image_ends, row_ends, right=True), prepend=row_ends.new_zeros(1))


def _check_variable_spans(is_image: Tensor, lengths: Tensor) -> None:
    """Every run of consecutive placeholders must hold whole images of the given lengths, in order."""
    edges = torch.nn.functional.pad(is_image.long(), (1, 1)).flatten().diff()  # rows padded: runs never join
    starts, ends = (edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0]
    run_ends = (ends - starts).cumsum(0)  # (runs,) slots up to the end of each run
    image_ends = lengths.to(run_ends.device).cumsum(0)  # (n,)
    aligned = torch.isin(run_ends, image_ends)
    if not bool(aligned.all()):
        t = is_image.shape[1] + 2
        first = int((~aligned).nonzero()[0, 0])
        raise ValueError(
            f"row {int(starts[first]) // t} has a run of {int(ends[first] - starts[first])} image placeholders at "
            f"position {int(starts[first]) % t} that does not end where an image ends (image spans "
            f"{lengths.tolist()[:8]} in splice order)"
        )


def _stack_if_uniform(image_embeds: Tensor | Sequence[Tensor] | None) -> Tensor | list[Tensor] | None:
    """A list of (s_i, c) tensors -> (n, s, c) when every s_i is equal (then the uniform path runs)."""
    if image_embeds is None or isinstance(image_embeds, Tensor):
        return image_embeds
    embeds = list(image_embeds)
    for i, e in enumerate(embeds):
        if not isinstance(e, Tensor) or e.ndim != 2:
            shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(f"image_embeds[{i}] must be an (s, c) tensor, got {shape}")
    if not embeds:
        return None
    if len({e.shape for e in embeds}) == 1:
        return torch.stack(embeds)
    return embeds


def splice_image_embeddings(
    input_ids: Tensor,
    image_embeds: Tensor | Sequence[Tensor] | None,
    embed_tokens: nn.Module,
    attention_mask: Tensor | None = None,
    *,
    pad_token_id: int = 0,
    images_per_sample: Tensor | Sequence[int] | None = None,
) -> SplicedInputs:
    """Embed `input_ids` with `embed_tokens` and write the image embeddings over the placeholder spans.

    input_ids: (b, t) long; image slots hold IMAGE_PLACEHOLDER_ID, in spans of s per image.
    image_embeds: (n, s, c) for the n images of the whole batch, in row order (row 0's images first,
        each row's images left to right), or a list of n (s_i, c) tensors when spans differ in length,
        or None when no row reads an image.
    embed_tokens: the LM's current input-embedding layer (so gradients reach it when it trains).
    attention_mask: (b, t), 1 for real tokens; ones when None. Works for left or right padding.
    images_per_sample: (b,) how many images each row should read; checked against the placeholders.

    Returns inputs_embeds (b, t, c) in the embedding layer's dtype, the attention mask (b, t) and
    position ids (b, t) from `position_ids_from_attention_mask`. The caller's tensors are not modified.
    Raises ValueError, with the numbers, when the placeholders and the image embeddings do not match,
    a placeholder sits on a padding slot, or an id is negative but not the placeholder.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (b, t), got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} and input_ids {tuple(input_ids.shape)} differ in shape"
        )
    is_image = input_ids == IMAGE_PLACEHOLDER_ID  # (b, t)
    bad = (input_ids < 0) & ~is_image
    if bool(bad.any()):
        raise ValueError(
            f"input_ids hold negative ids {sorted(set(input_ids[bad].tolist()))[:5]} that are not the image "
            f"placeholder {IMAGE_PLACEHOLDER_ID} (labels passed as input_ids?)"
        )
    if bool((is_image & (attention_mask == 0)).any()):
        raise ValueError("an image placeholder sits on a padding slot (attention_mask 0); the collator misaligned")
    image_embeds = _stack_if_uniform(image_embeds)
    if isinstance(image_embeds, list):
        return _splice_variable(
            input_ids, is_image, image_embeds, embed_tokens, attention_mask, pad_token_id, images_per_sample
        )

    num_slots = int(is_image.sum())
    num_images = 0 if image_embeds is None else image_embeds.shape[0]
    if image_embeds is not None and image_embeds.ndim != 3:
        raise ValueError(f"image_embeds must be (n, s, c), got {tuple(image_embeds.shape)}")
    tokens_per_image = image_embeds.shape[1] if image_embeds is not None else None
    if num_slots != num_images * (tokens_per_image or 0):
        per_image = f"{tokens_per_image} slots each" if tokens_per_image else "no image embeddings"
        raise ValueError(f"{num_slots} image placeholders in the batch but {num_images} images ({per_image})")
    if images_per_sample is not None and tokens_per_image:
        _check_images_per_sample(images_per_sample, image_counts(input_ids, tokens_per_image))

    embeds = embed_tokens(input_ids.masked_fill(is_image, pad_token_id))  # (b, t, c), a new tensor
    if num_images:
        _check_whole_spans(is_image, tokens_per_image)
        if image_embeds.shape[-1] != embeds.shape[-1]:
            raise ValueError(f"image embeddings are {image_embeds.shape[-1]} wide but the LM's are {embeds.shape[-1]}")
        # masked_scatter fills the True slots in row-major order: row 0's spans first, each left to right.
        embeds = embeds.masked_scatter(is_image[..., None], image_embeds.to(embeds.dtype))
    return SplicedInputs(embeds, attention_mask, position_ids_from_attention_mask(attention_mask))


def _check_images_per_sample(images_per_sample: Tensor | Sequence[int], found: Tensor) -> None:
    """ValueError when the (b,) images per row counted from the placeholders differ from `images_per_sample`."""
    expected = torch.as_tensor(images_per_sample, device=found.device).long()
    if expected.shape != found.shape or not torch.equal(expected, found):
        raise ValueError(
            f"rows read {found.tolist()} images by their placeholders but images_per_sample says {expected.tolist()}"
        )


def _splice_variable(
    input_ids: Tensor,
    is_image: Tensor,
    image_embeds: list[Tensor],
    embed_tokens: nn.Module,
    attention_mask: Tensor,
    pad_token_id: int,
    images_per_sample: Tensor | Sequence[int] | None,
) -> SplicedInputs:
    """`splice_image_embeddings` for images whose spans differ in length (same checks, same output)."""
    lengths = torch.tensor([e.shape[0] for e in image_embeds], dtype=torch.long, device=input_ids.device)
    num_slots = int(is_image.sum())
    if num_slots != int(lengths.sum()):
        raise ValueError(
            f"{num_slots} image placeholders in the batch but {len(image_embeds)} images ({int(lengths.sum())} slots "
            "in all)"
        )
    _check_variable_spans(is_image, lengths)
    if images_per_sample is not None:
        _check_images_per_sample(images_per_sample, _image_ends_per_row(is_image, lengths))
    embeds = embed_tokens(input_ids.masked_fill(is_image, pad_token_id))  # (b, t, c), a new tensor
    widths = {e.shape[-1] for e in image_embeds}
    if widths != {embeds.shape[-1]}:
        raise ValueError(f"image embeddings are {sorted(widths)} wide but the LM's are {embeds.shape[-1]}")
    flat = torch.cat([e.to(embeds.dtype) for e in image_embeds])  # (sum s_i, c), splice order
    embeds = embeds.masked_scatter(is_image[..., None], flat)
    return SplicedInputs(embeds, attention_mask, position_ids_from_attention_mask(attention_mask))
