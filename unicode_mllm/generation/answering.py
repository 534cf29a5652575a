"""Text answers (VQA, captions, chat): greedy or sampled decoding with the KV cache, batched, streamed.

A prompt is the builder's `question_prompt` (image + question, ending with the assistant role) or a
multi-turn `conversation_prompt`. Rows decode in left-padded batches until eos, a stop string (the
template's end of a non-final reply, see `prompts.reply_stop_strings`) or their token budget. A text reply never
holds pad, bos, `<image>`, `</img>` or ids past the text vocabulary, and holds `<img>` only with
`allow_images`, in which case the span is constrained like a text-to-image span and the image's ids are
returned apart from the text (where `<image>` marks the spot).

Token reduction: when `model.token_reduction` is enabled, the prompts' image spans are reduced
(`unicode_mllm.addons.token_reduction`: vision-stage merges before the splice, in-LM pruning during prefill) and
decoding runs on the reduced KV cache (`ReducedDecoder`); the text handling below is the same. It is
switched off (`reduction_for_mode(..., "image")`) when `allow_images` lets a reply write an image.

Streaming: text is handed out as it is decoded, held back only where the next token could still change
it (a partial UTF-8 character, trailing spaces, the start of a stop string), so the pieces of a row
join up to exactly the text it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from unicode_mllm.addons.token_reduction.guard import reduction_for_mode
from unicode_mllm.constants import IMAGE_PLACEHOLDER
from unicode_mllm.data.mllm_samples import MLLMSample
from unicode_mllm.errors import UserError
from unicode_mllm.generation.batch_prefill import DEFAULT_BATCH_SIZE, check_batching, prefill_prompts
from unicode_mllm.generation.constrained_span import OUTSIDE, image_span_constraint
from unicode_mllm.generation.image_inputs import ImageInput, images_to_token_ids
from unicode_mllm.generation.incremental_decoding import evaluation_mode, model_device
from unicode_mllm.generation.prompts import (
    check_fits,
    check_prompt_text,
    max_positions,
    prompt_builder,
    reply_stop_strings,
)
from unicode_mllm.generation.sampling import SamplingSettings, choose_next_tokens, row_seeds, uniform_draws
from unicode_mllm.token_layout import sequence_to_grid

if TYPE_CHECKING:
    from unicode_mllm.model.mllm import UniCodeMLLM

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 64

StreamCallback = Callable[[int, str], None]  # (question index, text piece)
LogitsProcessor = Callable[[Tensor, int], Tensor]  # ((b, V) raw logits of one batch, step) -> (b, V)


@dataclass
class Answer:
    """text: the reply, stripped; token_ids: (k,) int64 ids generated (eos and stop-string tokens included
    when reached, eos excluded); finish_reason: "eos", "stop" (a stop string), or "length" (the token
    budget or the LM's positions ran out); images: (h, w, d) token ids of images written in the reply."""

    text: str
    token_ids: Tensor
    finish_reason: str
    images: list[Tensor] = field(default_factory=list)


class _RowText:
    """The decoded text of one row, and how much of it has been streamed."""

    def __init__(self, text_tokenizer, stop_strings: Sequence[str]):
        self.tok = text_tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.done = ""  # finished text segments, with IMAGE_PLACEHOLDER where an image was written
        self.current: list[int] = []  # ids of the text segment being written
        self.span: list[int] = []  # code ids of the image being written
        self.generated: list[int] = []
        self.images: list[Tensor] = []
        self.emitted = ""
        self.finish_reason: str | None = None

    def _decode(self, ids: list[int]) -> str:
        # No space clean-up: it rewrites " ." to "." after the fact, so decoded text would not only grow.
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def text(self) -> tuple[str, bool]:
        """(the visible text, whether a stop string ended it)."""
        raw = (self.done + self._decode(self.current)).lstrip()
        cut = min((raw.find(s) for s in self.stop_strings if s in raw), default=-1)
        return (raw[:cut], True) if cut >= 0 else (raw, False)

    def _stable(self, text: str) -> str:
        """The part of unfinished text that more tokens cannot change."""
        if "\ufffd" in text:  # a multi-byte character split across tokens decodes to U+FFFD until complete
            text = text[: text.index("\ufffd")]
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    text = text[:-k]
                    break
        return text.rstrip()

    def piece(self) -> str:
        """The new streamable text since the last call ('' when nothing is safe to hand out yet)."""
        text, _ = self.text()
        target = text.rstrip() if self.finish_reason else self._stable(text)
        if not target.startswith(self.emitted) or len(target) == len(self.emitted):
            if self.finish_reason and not target.startswith(self.emitted):
                log.warning("streamed text %r is not a prefix of the final answer %r", self.emitted, target)
            return ""
        new, self.emitted = target[len(self.emitted) :], target
        return new


def _decode_batch(
    model: UniCodeMLLM,
    prompts: Sequence[MLLMSample],
    budgets: Sequence[int],
    *,
    sampling: SamplingSettings,
    seeds: Sequence[int] | None,
    allow_images: bool,
    use_cache: bool,
    cache_kind: str,
    logits_processor: LogitsProcessor | None,
    stop_strings: Sequence[str],
) -> Iterator[tuple[int, str] | list[Answer]]:
    """Decode one left-padded batch; yields (row, piece) while decoding, then the list of Answers last."""
    ids = model.token_ids
    device = model_device(model.lm)
    b, steps = len(prompts), max(budgets)
    # A reply that may write an image must read every token of its context: reduction off then.
    reduction = reduction_for_mode(model.token_reduction, "image" if allow_images else "text")
    # steps - 1 decoder steps follow the prefill at most (the last token needs none): a static cache holds them.
    decoder, logits = prefill_prompts(
        model, prompts, use_cache=use_cache, reduction=reduction, max_new_tokens=steps - 1, cache_kind=cache_kind
    )  # logits (b, V)
    constraint = image_span_constraint(model, logits.shape[-1], allow_image_start=allow_images)
    state = constraint.initial_state(b, inside=False, device=device)
    uniforms = None if seeds is None else uniform_draws(seeds, steps)  # (b, steps) on the CPU
    rows = [_RowText(model.text_tokenizer, stop_strings) for _ in range(b)]
    for step in range(steps):
        if logits_processor is not None:
            logits = logits_processor(logits, step)
        next_ids = choose_next_tokens(
            constraint.apply(logits, state), sampling, None if uniforms is None else uniforms[:, step]
        )
        was_inside = (state != OUTSIDE).tolist()  # one device sync per step, not one per row
        state = constraint.advance(state, next_ids)
        for r, (row, token) in enumerate(zip(rows, next_ids.tolist(), strict=True)):
            if row.finish_reason is not None:
                continue
            row.generated.append(token)
            if not was_inside[r] and token == ids.eos:
                row.finish_reason = "eos"
            elif not was_inside[r] and token == ids.image_start:
                row.done += row._decode(row.current) + IMAGE_PLACEHOLDER
                row.current = []
            elif was_inside[r] and token == ids.image_end:
                row.images.append(sequence_to_grid(torch.tensor(row.span), model.code_shape))
                row.span = []
            elif was_inside[r]:
                row.span.append(token)
            else:
                row.current.append(token)
            if row.finish_reason is None and row.text()[1]:
                row.finish_reason = "stop"
            if row.finish_reason is None and len(row.generated) >= budgets[r]:
                row.finish_reason = "length"
            piece = row.piece()
            if piece:
                yield r, piece
        if all(row.finish_reason is not None for row in rows):
            break
        # Finished rows keep a slot in the batch; what they are fed is never read.
        feed = torch.where(
            torch.tensor([row.finish_reason is not None for row in rows], device=device), ids.pad, next_ids
        )
        logits = decoder.step(feed)
    answers = []
    for row in rows:
        if row.span:
            log.warning("an answer ran out of tokens inside an image span; the partial image is dropped")
        tokens = row.generated[:-1] if row.finish_reason == "eos" else row.generated
        answers.append(
            Answer(row.text()[0].rstrip(), torch.tensor(tokens, dtype=torch.long), row.finish_reason, row.images)
        )
    yield answers


def _warn_short_budgets(budgets: Sequence[int], max_new_tokens: int, limit: int | None) -> None:
    """One warning when the LM's positions, not max_new_tokens, bound some answers: a cut there is otherwise silent."""
    short = [b for b in budgets if b < max_new_tokens]
    if short:
        which = "an answer" if len(short) == 1 else f"{len(short)} answers"
        log.warning(
            "%s limited to %d tokens (not max_new_tokens=%d) by the model's context of %d positions; "
            "shorten the question",
            which,
            min(short),
            max_new_tokens,
            limit,
        )


def _iter_answers(
    model: UniCodeMLLM,
    prompts: Sequence[MLLMSample],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    allow_images: bool = False,
    use_cache: bool = True,
    cache_kind: str = "auto",
    logits_processor: LogitsProcessor | None = None,
    stop_strings: Sequence[str] | None = None,
    first_index: int = 0,
) -> Iterator[tuple[int, str] | list[Answer]]:
    """Yields (question index, piece) while decoding, then all Answers (a list) last.

    first_index: the request index of prompts[0], for a request answered in several calls: row seeds
    and streamed indices count from it, so the calls give what one call would.
    """
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_batching(batch_size, cache_kind)
    sampling = SamplingSettings(temperature, top_k, top_p)
    limit = max_positions(model.lm)
    budgets = []
    for i, p in enumerate(prompts):
        check_fits(len(p), 1, limit, f"prompt {i}")
        budgets.append(max_new_tokens if limit is None else min(max_new_tokens, limit - len(p)))
    _warn_short_budgets(budgets, max_new_tokens, limit)
    request_seed = sampling.request_seed(seed)
    stops = reply_stop_strings(model.template) if stop_strings is None else tuple(stop_strings)
    answers: list[Answer] = []
    with evaluation_mode(model):
        for start in range(0, len(prompts), batch_size):
            chunk = range(start, min(start + batch_size, len(prompts)))
            seeds = row_seeds(request_seed, (first_index + i for i in chunk))
            for event in _decode_batch(
                model,
                [prompts[i] for i in chunk],
                [budgets[i] for i in chunk],
                sampling=sampling,
                seeds=seeds,
                allow_images=allow_images,
                use_cache=use_cache,
                cache_kind=cache_kind,
                logits_processor=logits_processor,
                stop_strings=stops,
            ):
                if isinstance(event, list):
                    answers.extend(event)
                else:
                    yield first_index + start + event[0], event[1]
    yield answers


def generate_answers(
    model: UniCodeMLLM,
    prompts: Sequence[MLLMSample],
    *,
    stream: StreamCallback | None = None,
    **settings,
) -> list[Answer]:
    """Built prompts -> one Answer each. `stream(index, piece)` receives text as it is decoded.

    settings: max_new_tokens, temperature (0 = greedy, the default), top_k, top_p, seed, batch_size,
    allow_images, use_cache, cache_kind ("auto": a KV cache preallocated for prompt + max_new_tokens where the LM
    supports transformers' StaticCache, "static" or "dynamic"; the same tokens), logits_processor, stop_strings (None
    = the template's), first_index.
    Raises UserError for a prompt longer than the LM's positions and for bad settings.
    """
    answers: list[Answer] = []
    for event in _iter_answers(model, prompts, **settings):
        if isinstance(event, list):
            answers = event
        elif stream is not None:
            stream(*event)
    return answers


def question_prompts(
    model: UniCodeMLLM, images: Sequence[ImageInput] | None, questions: Sequence[str]
) -> list[MLLMSample]:
    """(image, question) pairs -> prompts; `images` None (or None entries) for text-only questions.

    Raises UserError for an empty question, a bad image, or lists of different lengths.
    """
    questions = list(questions)
    images = [None] * len(questions) if images is None else list(images)
    if len(images) != len(questions):
        raise UserError(f"{len(images)} images but {len(questions)} questions; pass one image (or None) per question")
    texts = [check_prompt_text(q, "question") for q in questions]
    builder = prompt_builder(model)
    return [builder.question_prompt(ids, q) for ids, q in zip(images_to_token_ids(model, images), texts, strict=True)]


def answer_questions(
    model: UniCodeMLLM,
    images: Sequence[ImageInput] | None,
    questions: Sequence[str],
    *,
    stream: StreamCallback | None = None,
    **settings,
) -> list[Answer]:
    """Answer each question about its image (None: text only); see `generate_answers` for the settings."""
    return generate_answers(model, question_prompts(model, images, questions), stream=stream, **settings)


def answer(
    model: UniCodeMLLM, images: ImageInput | Sequence[ImageInput] | None, questions: str | Sequence[str], **settings
) -> list[str]:
    """Answer each question about its image: one stripped reply per question (`answer_questions`' texts).

    images: one per question, each a PIL image, an image path, a (3, H, W) float tensor in [-1, 1] or pre-extracted
    (h, w, d) int64 LLM token ids; None (or a None entry) for text only. A single question (a str) goes with a
    single image, not in a list. settings: `generate_answers`' (greedy by default; the model's `token_reduction`,
    when enabled, shortens the prompts' image spans, and is off with `allow_images`).
    Raises UserError for an empty question, a bad image or a prompt longer than the LM's positions.
    """
    if isinstance(questions, str):
        questions = [questions]
        images = images if images is None or isinstance(images, list | tuple) else [images]
    return [a.text for a in answer_questions(model, images, questions, **settings)]


def stream_answer(model: UniCodeMLLM, image: ImageInput, question: str, **settings) -> Iterator[str]:
    """Yield the answer to one question piece by piece as it is decoded; the pieces join to the answer."""
    for event in _iter_answers(model, question_prompts(model, [image], [question]), **settings):
        if not isinstance(event, list):
            yield event[1]
