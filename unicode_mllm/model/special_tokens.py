"""The multimodal special tokens in the text tokenizer and the LM's vocabulary.

`add_multimodal_tokens` makes sure `<img>`, `</img>` and `<image>` (and a pad token) are single special
tokens of the text tokenizer, then grows the LM's input and output embeddings to cover every id that
the text tokenizer or the visual tokenizer can hand out. Growing only ever appends rows: the ids that
existed before, and so every visual code's token id, keep their rows unchanged. New rows start at the
mean of the old ones (deterministic; LLaVA's `smart_tokenizer_and_embedding_resize` does the same),
not at HF's sampled `mean_resizing`, so that two runs from the same checkpoint build the same model.

The ids of a prepared tokenizer are read by `unicode_mllm/token_layout.py` (`multimodal_token_ids`), which the
data pipeline shares without loading the model. Tokenizers that already hold the sentinels (the project's own BPE,
see `stages/lm/text_tokenizer.py`) are left as they are and the LM is not resized.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from unicode_mllm.errors import UserError
from unicode_mllm.token_layout import (  # the token layout data/ shares; re-exported here
    FALLBACK_PAD_TOKEN,
    MULTIMODAL_TOKENS,
    MultimodalTokenIds,
    multimodal_token_ids,
    single_special_token_id,
    special_token_ids,
    special_token_texts,
)

log = logging.getLogger(__name__)


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


__all__ = [
    "FALLBACK_PAD_TOKEN",
    "MULTIMODAL_TOKENS",
    "MultimodalTokenIds",
    "add_multimodal_tokens",
    "multimodal_token_ids",
    "resize_keeping_rows",
    "single_special_token_id",
    "special_token_ids",
    "special_token_texts",
]
