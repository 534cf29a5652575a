"""How images and the multimodal sentinels lie in a token sequence: the layout that the data pipeline (`data/`)
and the model (`model/`) share, below both of them (it imports neither).

- Reading modes: an image is read either `aggregated` (h*w embeddings, each the sum over depth of a position's
  code embeddings) or `interleaved` (h*w*d embeddings, one per code token id).
- Writing order: the written form of an image is `<img>` + h*w*d ids + `</img>`, the ids in raster order over
  the (h, w) grid and depth-first within a position: position (0, 0) depths 0..d-1, then (0, 1), ... For the
  decompression task the sequence is cut into T segments of whole positions, one assistant turn each (the
  reference code uses one top-grid row per segment, T = h). The first segment opens with `<img>` and the last
  closes with `</img>`, so the assistant turns joined are exactly the written form. These functions work on LLM
  token ids (or codes: the order is the same) and never on text.
- Special tokens: the ids of `<img>`, `</img>`, `<image>`, pad, eos and bos in a prepared text tokenizer
  (`model/special_tokens.add_multimodal_tokens` prepares one and grows the LM to match).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import torch
from einops import rearrange
from torch import Tensor

from unicode_mllm.constants import IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START
from unicode_mllm.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ReadingMode = Literal["aggregated", "interleaved"]
READING_MODES: tuple[str, ...] = ("aggregated", "interleaved")


# ----- the writing order of an image's ids ---------------------------------------------------------------------


def _check_grid(grid: Tensor, code_shape: Sequence[int] | None = None) -> None:
    if grid.ndim != 3:
        raise ValueError(f"an image's ids must be (h, w, d), got {tuple(grid.shape)}")
    if code_shape is not None and tuple(grid.shape) != tuple(code_shape):
        raise ValueError(
            f"an image's ids are {tuple(grid.shape)} but the visual tokenizer's code_shape is {tuple(code_shape)}"
        )


def grid_to_sequence(grid: Tensor) -> Tensor:
    """(..., h, w, d) ids -> (..., h*w*d): raster order over positions, depth-first within one."""
    return rearrange(grid, "... h w d -> ... (h w d)")


def sequence_to_grid(sequence: Tensor, code_shape: Sequence[int]) -> Tensor:
    """(..., h*w*d) ids -> (..., h, w, d), the inverse of `grid_to_sequence`.

    Raises ValueError when the length is not h*w*d.
    """
    h, w, d = code_shape
    if sequence.shape[-1] != h * w * d:
        raise ValueError(f"an image needs h*w*d = {h}*{w}*{d} = {h * w * d} ids, got {sequence.shape[-1]}")
    return rearrange(sequence, "... (h w d) -> ... h w d", h=h, w=w, d=d)


def check_num_segments(code_shape: Sequence[int], num_segments: int) -> None:
    """Raise ValueError unless T divides the h*w positions (a segment holds whole positions)."""
    h, w, _ = code_shape
    if num_segments < 1 or (h * w) % num_segments:
        raise ValueError(
            f"decompression segments T={num_segments} must divide the h*w = {h}*{w} = {h * w} positions "
            f"(T = h = {h} gives one grid row per segment)"
        )


def split_into_segments(grid: Tensor, num_segments: int) -> list[Tensor]:
    """(h, w, d) ids -> T tensors of (h*w*d / T,) ids, in writing order. Raises ValueError for a bad T."""
    _check_grid(grid)
    check_num_segments(grid.shape, num_segments)
    return list(grid_to_sequence(grid).chunk(num_segments))


def segments_to_grid(segments: Sequence[Tensor], code_shape: Sequence[int]) -> Tensor:
    """The inverse of `split_into_segments`: T id tensors (any lengths that add up) -> (h, w, d).

    Raises ValueError when the segments do not hold exactly h*w*d ids.
    """
    if not segments:
        raise ValueError("no segments to join")
    return sequence_to_grid(torch.cat([s.reshape(-1) for s in segments]), code_shape)


# ----- the multimodal special tokens --------------------------------------------------------------------------

MULTIMODAL_TOKENS: tuple[str, ...] = (IMAGE_START, IMAGE_END, IMAGE_PLACEHOLDER)
FALLBACK_PAD_TOKEN = "<pad>"  # added only when the text tokenizer has no pad token (LLaMA's has none)


@dataclass(frozen=True)
class MultimodalTokenIds:
    """LLM vocabulary ids of the multimodal sentinels and of the tokens the data pipeline needs."""

    image_start: int  # `<img>`: opens an image span (read or written)
    image_end: int  # `</img>`: closes it
    image_placeholder: int  # `<image>` as the text tokenizer encodes it (the prompt marker, never an input id)
    pad: int
    eos: int
    bos: int | None

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int | None]) -> MultimodalTokenIds:
        return cls(**data)  # type: ignore[arg-type]


def special_token_ids(text_tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of every special token: the named ones and every added token flagged special.

    transformers 5 leaves tokens added with `add_tokens(..., special_tokens=True)` out of
    `all_special_ids`, though the tokenizer never splits them; both count here.
    """
    added = {int(i) for i, token in text_tokenizer.added_tokens_decoder.items() if token.special}
    return set(text_tokenizer.all_special_ids) | added


def special_token_texts(text_tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The text of every special token (see `special_token_ids`), e.g. to keep it out of plain text."""
    texts = set(text_tokenizer.all_special_tokens)
    texts |= {token.content for token in text_tokenizer.added_tokens_decoder.values() if token.special}
    return tuple(sorted(t for t in texts if t))


def single_special_token_id(text_tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of `token` when the text tokenizer encodes it as one special token, else None."""
    ids = text_tokenizer.encode(token, add_special_tokens=False)
    if len(ids) == 1 and ids[0] in special_token_ids(text_tokenizer):
        return int(ids[0])
    return None


def multimodal_token_ids(text_tokenizer: PreTrainedTokenizerBase) -> MultimodalTokenIds:
    """Read the ids of an already prepared text tokenizer.

    Raises UserError naming the token that is missing or not a single special token.
    """
    found = {token: single_special_token_id(text_tokenizer, token) for token in MULTIMODAL_TOKENS}
    missing = [token for token, i in found.items() if i is None]
    if missing:
        raise UserError(
            f"text tokenizer lacks the special tokens {missing} (or splits them); run add_multimodal_tokens first"
        )
    for name in ("pad_token_id", "eos_token_id"):
        if getattr(text_tokenizer, name) is None:
            raise UserError(f"text tokenizer has no {name}; run add_multimodal_tokens first")
    return MultimodalTokenIds(
        image_start=found[IMAGE_START],  # type: ignore[arg-type]
        image_end=found[IMAGE_END],  # type: ignore[arg-type]
        image_placeholder=found[IMAGE_PLACEHOLDER],  # type: ignore[arg-type]
        pad=int(text_tokenizer.pad_token_id),
        eos=int(text_tokenizer.eos_token_id),
        bos=None if text_tokenizer.bos_token_id is None else int(text_tokenizer.bos_token_id),
    )


__all__ = [
    "FALLBACK_PAD_TOKEN",
    "MULTIMODAL_TOKENS",
    "READING_MODES",
    "MultimodalTokenIds",
    "ReadingMode",
    "check_num_segments",
    "grid_to_sequence",
    "multimodal_token_ids",
    "segments_to_grid",
    "sequence_to_grid",
    "single_special_token_id",
    "special_token_ids",
    "special_token_texts",
    "split_into_segments",
]
