"""The start of batched decoding: built prompts -> one left-padded batch, images read and spliced, LM prefilled.

Answers and text-to-image both begin here; what they do with the returned decoder afterwards (stop strings
and streaming, or the constrained image span with guidance) is theirs. With token reduction enabled the
prompt's image spans are reduced and decoding continues on the reduced KV cache (`ReducedDecoder`);
otherwise `IncrementalDecoder` keeps Hugging Face's cache (or none, `use_cache=False`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from unicode_mllm.addons.token_reduction.config import TokenReductionConfig
from unicode_mllm.data.mllm_samples import MLLMCollator, MLLMSample
from unicode_mllm.errors import UserError
from unicode_mllm.generation.incremental_decoding import CACHE_KINDS, IncrementalDecoder, model_device
from unicode_mllm.generation.reduced_decoding import ReducedDecoder

if TYPE_CHECKING:
    from unicode_mllm.model.mllm import UniCodeMLLM

DEFAULT_BATCH_SIZE = 8  # prompts decoded together, answers and images alike


def check_batching(batch_size: int, cache_kind: str) -> None:
    """UserError for a batch size below 1 or an unknown KV cache kind (answers and text-to-image alike)."""
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if cache_kind not in CACHE_KINDS:
        raise UserError(f"cache_kind must be one of {list(CACHE_KINDS)}, got {cache_kind!r}")


def prefill_prompts(
    model: UniCodeMLLM,
    prompts: Sequence[MLLMSample],
    *,
    use_cache: bool = True,
    reduction: TokenReductionConfig | None = None,
    max_new_tokens: int | None = None,
    cache_kind: str = "auto",
    compile_step: bool = False,
) -> tuple[IncrementalDecoder | ReducedDecoder, Tensor]:
    """Left-pad `prompts` (b of them) into one batch and run the LM over it, images spliced in.

    Returns the decoder holding the batch's context (`step((b,) ids)` continues every row) and the (b, V)
    fp32 logits of each row's next token. `reduction` (when enabled) reduces the images' tokens.
    max_new_tokens / cache_kind: the most steps that will follow and the KV cache kind (`IncrementalDecoder`:
    with max_new_tokens a static-capable LM gets a preallocated cache unless cache_kind is "dynamic"); compile_step:
    decode steps through torch.compile (static cache only; `IncrementalDecoder`).
    """
    device = model_device(model.lm)
    batch = MLLMCollator(model.token_ids.pad, padding_side="left")(list(prompts))
    inputs = (
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        batch["image_token_ids"],
        batch["images_per_sample"],
        batch["image_is_uncompressed"],
    )
    if reduction is not None and reduction.enabled:
        reduced = ReducedDecoder(model, reduction)
        return reduced, reduced.prefill(*inputs)  # (b, V)
    spliced = model.build_inputs(*inputs)
    decoder = IncrementalDecoder(model.lm, use_cache=use_cache, cache_kind=cache_kind, compile_step=compile_step)
    return decoder, decoder.prefill(spliced.inputs_embeds, spliced.attention_mask, max_new_tokens=max_new_tokens)
