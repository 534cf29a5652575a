"""Inference: sampling, the constrained image span, classifier-free guidance, answers and drawings.

Flat exports; see each module's docstring. The two entry points: `answer(model, images, questions)` (the reply
texts) and `generate_images(model, prompts)` (ids, pixels and `.images`); this package sits above `model/`, which
knows nothing of it.
"""

from unicode_mllm.generation.answering import (
    Answer,
    answer,
    answer_questions,
    generate_answers,
    question_prompts,
    stream_answer,
)
from unicode_mllm.generation.chat import ChatSession, ChatSettings
from unicode_mllm.generation.constrained_span import (
    OUTSIDE,
    ImageSpanConstraint,
    image_span_constraint,
    text_banned_token_ids,
)
from unicode_mllm.generation.guidance import check_cfg_scale, mix_guidance
from unicode_mllm.generation.image_generation import (
    ImageGeneration,
    decode_token_ids,
    generate_image_sequences,
    generate_images,
    unconditional_prompt,
)
from unicode_mllm.generation.image_inputs import ImageInput, fit_to_size, images_to_token_ids, load_image_for
from unicode_mllm.generation.incremental_decoding import IncrementalDecoder
from unicode_mllm.generation.prompts import (
    check_prompt_text,
    conversation_prompt,
    max_positions,
    prompt_builder,
    reply_stop_strings,
)
from unicode_mllm.generation.sampling import (
    SamplingSettings,
    choose_next_tokens,
    filter_logits,
    row_seed,
    sample_from_probs,
    uniform_draws,
)

__all__ = [
    "OUTSIDE",
    "Answer",
    "ChatSession",
    "ChatSettings",
    "ImageGeneration",
    "ImageInput",
    "ImageSpanConstraint",
    "IncrementalDecoder",
    "SamplingSettings",
    "answer",
    "answer_questions",
    "check_cfg_scale",
    "check_prompt_text",
    "choose_next_tokens",
    "conversation_prompt",
    "decode_token_ids",
    "filter_logits",
    "fit_to_size",
    "generate_answers",
    "generate_image_sequences",
    "generate_images",
    "image_span_constraint",
    "images_to_token_ids",
    "load_image_for",
    "max_positions",
    "mix_guidance",
    "prompt_builder",
    "question_prompts",
    "reply_stop_strings",
    "row_seed",
    "sample_from_probs",
    "stream_answer",
    "text_banned_token_ids",
    "unconditional_prompt",
    "uniform_draws",
]
