"""The multimodal special tokens in the text tokenizer and the LM's vocabulary.

`add_multimodal_tokens` makes sure `<img>`, `</img>` and `<image>` (and a pad token) are single special
tokens of the text tokenizer, then grows the LM's input and output embeddings to cover every id that
the text tokenizer or the visual tokenizer can hand out. Growing only ever appends rows: the ids that
existed before, and so every visual code's token id, keep their rows unchanged. New rows start at the
mean of the old ones (deterministic; LLaVA's `smart_tokenizer_and_embedding_resize` does the same),
not at HF's sampled `mean_resizing`, so that two runs from the same checkpoint build the same model.

Tokenizers that already hold the sentinels (the project's own BPE, see `lm/text_tokenizer.py`) are left
as they are and the LM is not resized.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from unicode_mllm.constants import IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START
from unicode_mllm.errors import UserError

log = logging.getLogger(__name__)

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


def add_multimodal_tokens(
    text_tokenizer: PreTrainedTokenizerBase,
    lm: PreTrainedModel | None = None,
    code_token_ids: Sequence[int] | torch.Tensor = (),
) -> MultimodalTokenIds:
    """Add the multimodal sentinels (and a pad token) where missing; grow `lm`'s embeddings to match.

    text_tokenizer: edited in place (tokens appended after the current vocabulary).
    lm: a HF causal LM, resized in place so that its vocabulary covers `len(text_tokenizer)` and every
        id in `code_token_ids`; existing rows are kept bit for bit, new rows start at the mean row.
    code_token_ids: the visual tokenizer's `code_to_token_id`; no new text token may take one of them.

    Raises UserError when a new text token would take the id of a visual code (a 'separate' codebook
    appended its codes after a text vocabulary that lacked the sentinels: add them before stage 1).
    """
    codes = set(torch.as_tensor(code_token_ids, dtype=torch.long).tolist())
    missing = [token for token in MULTIMODAL_TOKENS if single_special_token_id(text_tokenizer, token) is None]
    if missing:
        log.info("text tokenizer: adding special tokens %s after id %d", missing, len(text_tokenizer) - 1)
        text_tokenizer.add_tokens(missing, special_tokens=True)
    if text_tokenizer.pad_token_id is None:
        text_tokenizer.add_special_tokens({"pad_token": FALLBACK_PAD_TOKEN})
    ids = multimodal_token_ids(text_tokenizer)

    taken = sorted(codes & {ids.image_start, ids.image_end, ids.image_placeholder, ids.pad, ids.eos})
    if taken:
        raise UserError(
            f"text tokenizer special ids {taken} are also visual code token ids; add {list(MULTIMODAL_TOKENS)} "
            "to the text tokenizer before building the visual tokenizer's codebook"
        )
    if lm is not None:
        needed = max(len(text_tokenizer), max(codes, default=-1) + 1)
        resize_keeping_rows(lm, needed)
    return ids


@torch.no_grad()
def resize_keeping_rows(lm: PreTrainedModel, vocab_size: int) -> None:
    """Grow the LM's input (and untied output) embeddings to `vocab_size` rows; never shrink.

    Rows [0, old) are untouched; rows [old, vocab_size) are set to the mean of the old rows.
    """
    old = lm.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return  # a larger LM vocabulary (padded for speed) already covers every id
    lm.resize_token_embeddings(vocab_size, mean_resizing=False)
    tables = [lm.get_input_embeddings()]
    output = lm.get_output_embeddings()
    if output is not None and output.weight is not tables[0].weight:
        tables.append(output)
    for table in tables:
        table.weight[old:] = table.weight[:old].mean(dim=0, keepdim=True).to(table.weight.dtype)
    log.info("LM vocabulary grown from %d to %d rows", old, vocab_size)
