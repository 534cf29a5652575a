"""Inference prompts laid out exactly as training lays them out, and the LM's length limit.

Prompts come from the model's own `MLLMSampleBuilder` (same text tokenizer, template, code shape and
reading mode), so a question or a drawing instruction reaches the LLM in the layout it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from unicode_mllm.constants import IGNORE_INDEX
from unicode_mllm.data.conversation import EOS, ConversationTemplate, Turn, get_template
from unicode_mllm.data.mllm_samples import MLLMSample, MLLMSampleBuilder
from unicode_mllm.errors import UserError

if TYPE_CHECKING:
    from unicode_mllm.model.mllm import UniCodeMLLM

# Config fields that hold the number of positions a causal LM can attend over, by architecture family.
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def prompt_builder(model: UniCodeMLLM) -> MLLMSampleBuilder:
    """The sample builder matching `model` (template, code shape, reading mode, the compressor's span length);
    prompts raise on error."""
    limit = max_positions(model.lm)
    return MLLMSampleBuilder(
        model.text_tokenizer,
        model.code_shape,
        template=model.template,
        reading=model.reading,
        max_length=limit if limit is not None else 1 << 30,
        strict=True,
        read_tokens_per_image=model.tokens_per_image,
    )


def max_positions(lm: Any) -> int | None:
    """The LM's longest sequence (e.g. LLaMA's `max_position_embeddings`), or None when it declares none."""
    config = getattr(lm, "config", None)
    for name in _POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits(prompt_length: int, new_tokens: int, limit: int | None, what: str) -> None:
    """Raise UserError when a prompt of `prompt_length` tokens plus `new_tokens` exceeds `limit` positions."""
    if limit is None:
        return
    if prompt_length + new_tokens > limit:
        raise UserError(
            f"{what} is {prompt_length} tokens and needs {new_tokens} more, but the LM attends over at most "
            f"{limit} positions (max_position_embeddings); shorten the prompt"
        )


def check_prompt_text(text: str, what: str = "prompt") -> str:
    """Raise UserError for an empty (or blank) prompt; returns the text stripped."""
    if not isinstance(text, str):
        raise UserError(f"the {what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise UserError(f"the {what} is empty; write some text (e.g. 'a red circle at the top left')")
    return text.strip()


def prompt_sample(builder: MLLMSampleBuilder, input_ids: Tensor) -> MLLMSample:
    """(t,) prompt ids without images -> an `MLLMSample` the collator pads (labels all IGNORE_INDEX)."""
    h, w, d = builder.code_shape
    return MLLMSample(
        input_ids=input_ids,
        labels=torch.full_like(input_ids, IGNORE_INDEX),
        image_token_ids=torch.zeros(0, h, w, d, dtype=torch.long),
        task="prompt",
    )


def conversation_prompt(builder: MLLMSampleBuilder, turns: Sequence[Turn], images: Sequence[Tensor]) -> MLLMSample:
    """A multi-turn prompt: `turns` (the last one's reply None or an open image) with the images read.

    Goes through the builder's prompt path (strict, no length check) so that earlier replies, written
    images and read images are laid out exactly as in training.
    """
    # The builder has no public multi-turn prompt entry; `_build_strict` is the one its own
    # `question_prompt` and `text_to_image_prompt` use.
    return builder._build_strict(turns, list(images), "prompt")


def reply_stop_strings(template: ConversationTemplate | str) -> tuple[str, ...]:
    """Text that ends a reply other than eos: the template's end of a non-final reply.

    `plain` ends every reply but the last with "\\n" (one exchange per line), and a single question is a
    conversation's first turn, which training closed with "\\n" far more often than with eos: stopping only
    at "\\nUSER:" let the model append a caption or garbage to a right answer. Templates that close every
    reply with eos need nothing more.
    """
    template = get_template(template) if isinstance(template, str) else template
    if EOS in template.assistant_end or not template.assistant_end.strip(" "):
        return ()
    return (template.assistant_end,)
