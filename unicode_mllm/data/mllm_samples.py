"""Stage-2 training samples: VQA, captioning, text-to-image and image decompression conversations.

A builder renders a conversation with a template (`data/conversation.py`), tokenizes the text once
with offsets, and labels exactly the tokens inside the assistant replies; everything else, the
system line, the user turns, the roles and every image the LLM reads, is IGNORE_INDEX. Images enter as
LLM token ids (h, w, d) (`VisualTokenizer.codes_to_token_ids` of its codes):

- an image the LLM reads becomes `<img>` + s placeholder slots (IMAGE_PLACEHOLDER_ID) + `</img>`, with
  s = h*w for `aggregated` reading and h*w*d for `interleaved`; the model splices the embeddings in. A
  model with a visual-token compressor reads `read_tokens_per_image` slots instead (the compressor's
  `num_output_tokens(h, w)`), except in decompression samples, which read the uncompressed grid (the task
  is h*w -> h*w*d): each sample's `image_is_uncompressed` says which reads are full;
- an image the LLM writes becomes `<img>` + its h*w*d ids in writing order + `</img>`, all labelled.

Never dropped silently: a sample that cannot be built, is too long, has a template
mismatch (a token straddling a label boundary, a marker the text tokenizer splits, reserved text) or
misses its image raises `SampleError` in strict mode (the default), else returns None and is counted
by reason in a `SkipCounter`, whose summary and `max_skip_fraction` check belong at the end of every
epoch. Over-long samples are skipped unless `overflow="truncate"` is asked for; truncation is counted,
and one that would cut through an image span is an error, never a partial image.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from unicode_mllm.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from unicode_mllm.data.conversation import (
    ConversationTemplate,
    ImageRead,
    ImageWrite,
    RenderedConversation,
    Turn,
    get_template,
)
from unicode_mllm.data.stream import SkipDelta
from unicode_mllm.errors import UserError
from unicode_mllm.token_layout import (
    READING_MODES,
    ReadingMode,
    check_num_segments,
    multimodal_token_ids,
    special_token_texts,
    split_into_segments,
)

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("vqa", "caption", "text_to_image", "decompression")

# Skip reasons, one name each so that counts add up across workers.
TOO_LONG = "too long"
TEMPLATE_MISMATCH = "template mismatch"
MISSING_IMAGE = "missing image"
MISSING_TEXT = "missing text"
NO_LABELS = "no labels"


class SampleError(UserError, ValueError):
    """A sample that cannot be built, raised in strict mode; `reason` is one of the skip reasons."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class SkipCounter:
    """Counts built, skipped (by reason) and truncated samples; strict mode raises instead of skipping.

    `check()` raises UserError once skipped / (built + skipped) exceeds `max_skip_fraction`.
    """

    def __init__(self, strict: bool = True, max_skip_fraction: float | None = None):
        if max_skip_fraction is not None and not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.strict = strict
        self.max_skip_fraction = max_skip_fraction
        self.reset()

    def reset(self) -> None:
        self.built = 0
        self.truncated = 0
        self.skipped: Counter[str] = Counter()
        self.source = ""  # the data source whose records are being built (set by the stage-2 stream)
        self.by_source: dict[str, Counter[str]] = {}  # per source: "built" and every skip reason

    def add_built(self) -> None:
        self.built += 1
        self.by_source.setdefault(self.source, Counter())["built"] += 1

    def skip(self, reason: str, message: str) -> None:
        """Raise SampleError in strict mode, else count the skip under `reason` (and the current source)."""
        if self.strict:
            raise SampleError(reason, message)
        self.skipped[reason] += 1
        self.by_source.setdefault(self.source, Counter())[reason] += 1
        log.debug("skipped sample (%s): %s", reason, message)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def fraction(self) -> float:
        total = self.built + self.num_skipped
        return self.num_skipped / total if total else 0.0

    def summary(self) -> str:
        """One line, e.g. "skipped 2 of 50 samples (4.00%): 2 too long; 1 truncated"."""
        text = f"skipped {self.num_skipped} of {self.built + self.num_skipped} samples ({100 * self.fraction:.2f}%)"
        if self.skipped:
            text += ": " + ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        if self.truncated:
            text += f"; {self.truncated} truncated"
        if len(self.by_source) > 1:
            parts = []
            for name, counts in sorted(self.by_source.items()):
                skipped = sum(n for reason, n in counts.items() if reason != "built")
                reasons = ", ".join(f"{n} {r}" for r, n in counts.most_common() if r != "built")
                parts.append(f"{name} {skipped} of {skipped + counts['built']}" + (f" ({reasons})" if reasons else ""))
            text += "; by source: " + "; ".join(parts)
        return text

    def check(self, *, at_least: int = 0) -> None:
        """Raise UserError past `max_skip_fraction`; `at_least`: only once that many samples were seen."""
        if self.built + self.num_skipped < at_least:
            return
        if self.max_skip_fraction is not None and self.fraction > self.max_skip_fraction:
            raise UserError(
                f"{self.summary()} exceeds data.max_skip_fraction={self.max_skip_fraction}; fix the data or the "
                "template, raise data.max_length, or raise data.max_skip_fraction"
            )

    def state_dict(self) -> dict[str, Any]:
        """The counts as plain JSON (saved in checkpoints so a resumed run keeps counting)."""
        return {
            "built": self.built,
            "truncated": self.truncated,
            "skipped": dict(self.skipped),
            "by_source": {name: dict(counts) for name, counts in self.by_source.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.built, self.truncated = int(state.get("built", 0)), int(state.get("truncated", 0))
        self.skipped = Counter(state.get("skipped", {}))
        self.by_source = {name: Counter(counts) for name, counts in state.get("by_source", {}).items()}

    def to_delta(self) -> SkipDelta:
        """The skips as a `SkipDelta`, to travel with batches from data-loader workers (see data/stream.py)."""
        return SkipDelta(samples=dict(self.skipped))


@dataclass
class MLLMSample:
    """input_ids, labels: (t,) int64, IMAGE_PLACEHOLDER_ID in read spans, IGNORE_INDEX off the replies;
    image_token_ids: (n, h, w, d) int64 LLM token ids of the n images read, in span order;
    image_is_uncompressed: (n,) bool, True where the span holds the uncompressed grid (decompression reads)
    rather than the model's compressed read (None: all False)."""

    input_ids: Tensor
    labels: Tensor
    image_token_ids: Tensor
    task: str
    sample_id: str = ""
    image_is_uncompressed: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.image_token_ids.shape[0]
        if self.image_is_uncompressed is None:
            self.image_is_uncompressed = torch.zeros(n, dtype=torch.bool)
        elif tuple(self.image_is_uncompressed.shape) != (n,):
            raise ValueError(
                f"image_is_uncompressed {tuple(self.image_is_uncompressed.shape)} must hold one flag per image ({n})"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class TaskPrompts:
    """The fixed user text of the tasks whose user turn is not data."""

    caption: str = "Describe the image."
    decompression: str = "Write part {part} of {total} of the image."


@dataclass
class MLLMSampleBuilder:
    """Builds `MLLMSample`s for one text tokenizer, template and visual code shape.

    code_shape: (h, w, d) of the visual tokenizer (`VisualTokenizer.code_shape`).
    reading: `aggregated` (h*w slots per image read) or `interleaved` (h*w*d slots).
    read_tokens_per_image: slots of a compressed read (`UniCodeMLLM.tokens_per_image`, the compressor's
        `num_output_tokens(h, w)`); None for no compressor. Decompression samples always read h*w.
    max_length: the longest sequence allowed, bos and image spans included.
    overflow: `skip` (count or raise) or `truncate` (cut text at max_length; counted; an error in an image).
    cfg_drop_rate: probability that a text-to-image prompt is replaced by the empty prompt.
    num_segments: decompression turns T, dividing h*w; None for one grid row per turn (T = h).
    seed: seeds the prompt-drop draws, so a builder replays the same drops.
    """

    text_tokenizer: Any
    code_shape: tuple[int, int, int]
    template: ConversationTemplate | str = "plain"
    reading: ReadingMode = "aggregated"
    max_length: int = 1024
    strict: bool = True
    overflow: Literal["skip", "truncate"] = "skip"
    cfg_drop_rate: float = 0.0
    num_segments: int | None = None
    seed: int = 0
    prompts: TaskPrompts = field(default_factory=TaskPrompts)
    skips: SkipCounter | None = None
    read_tokens_per_image: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.template, str):
            self.template = get_template(self.template)
        self.code_shape = tuple(int(x) for x in self.code_shape)  # type: ignore[assignment]
        if len(self.code_shape) != 3:
            raise ValueError(f"code_shape must be (h, w, d), got {self.code_shape}")
        if self.reading not in READING_MODES:
            raise ValueError(f"reading {self.reading!r} is unknown; choose one of {list(READING_MODES)}")
        if self.overflow not in ("skip", "truncate"):
            raise ValueError(f"overflow {self.overflow!r} is unknown; choose 'skip' or 'truncate'")
        if not 0.0 <= self.cfg_drop_rate <= 1.0:
            raise ValueError(f"cfg_drop_rate must lie in [0, 1], got {self.cfg_drop_rate}")
        if self.read_tokens_per_image is not None:
            value = self.read_tokens_per_image
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"read_tokens_per_image must be a positive int or None, got {value!r}")
            if self.reading != "aggregated" and value != self.uncompressed_tokens_per_image:
                raise ValueError(
                    f"read_tokens_per_image={value} compresses the read span, which needs reading='aggregated' "
                    f"(got reading={self.reading!r}, whose span is {self.uncompressed_tokens_per_image})"
                )
        h, _, _ = self.code_shape
        self.num_segments = h if self.num_segments is None else self.num_segments
        check_num_segments(self.code_shape, self.num_segments)
        if self.skips is None:
            self.skips = SkipCounter(strict=self.strict)
        elif self.skips.strict != self.strict:
            raise ValueError(f"builder strict={self.strict} but its SkipCounter has strict={self.skips.strict}")
        ids = multimodal_token_ids(self.text_tokenizer)  # UserError when the sentinels are missing
        self.image_start_id, self.image_end_id = ids.image_start, ids.image_end
        self.image_marker_id = ids.image_placeholder
        self._reserved_text = special_token_texts(self.text_tokenizer)
        self._rng = random.Random(self.seed)

    # ----- sizes --------------------------------------------------------------------------------

    @property
    def uncompressed_tokens_per_image(self) -> int:
        """Placeholder slots of an uncompressed read: h*w (aggregated) or h*w*d (interleaved)."""
        h, w, d = self.code_shape
        return h * w if self.reading == "aggregated" else h * w * d

    @property
    def tokens_per_image(self) -> int:
        """Placeholder slots one read image takes: `read_tokens_per_image` when set, else the uncompressed span."""
        return self.read_tokens_per_image or self.uncompressed_tokens_per_image

    @property
    def num_write_tokens(self) -> int:
        h, w, d = self.code_shape
        return h * w * d

    # ----- the tasks ----------------------------------------------------------------------------

    def vqa(
        self, image_token_ids: Tensor | None, qa: Sequence[tuple[str, str]], sample_id: str = ""
    ) -> MLLMSample | None:
        """A multi-turn VQA conversation about one image; the image opens the first user turn."""
        if not qa:
            return self._skip(MISSING_TEXT, sample_id, "no question/answer pairs")
        turns = [Turn((ImageRead(0), q) if i == 0 else q, a) for i, (q, a) in enumerate(qa)]
        return self.conversation(turns, [image_token_ids], "vqa", sample_id)

    def caption(self, image_token_ids: Tensor | None, caption: str, sample_id: str = "") -> MLLMSample | None:
        """The image and `prompts.caption` in, the caption out."""
        if not caption:
            return self._skip(MISSING_TEXT, sample_id, "empty caption")
        turns = [Turn((ImageRead(0), self.prompts.caption), caption)]
        return self.conversation(turns, [image_token_ids], "caption", sample_id)

    def text_to_image(
        self, prompt: str, image_token_ids: Tensor | None, sample_id: str = "", drop_prompt: bool | None = None
    ) -> MLLMSample | None:
        """The prompt in, `<img>` + h*w*d ids + `</img>` out (all labelled).

        drop_prompt: replace the prompt by the empty one (classifier-free guidance's unconditional
        branch); None draws it with probability `cfg_drop_rate` from the builder's seeded RNG.
        The task is `text_to_image_uncond` when dropped.
        """
        if image_token_ids is None:
            return self._skip(MISSING_IMAGE, sample_id, "no image to write")
        if not self._check_image(image_token_ids, sample_id):
            return None
        if drop_prompt is None:
            drop_prompt = self.cfg_drop_rate > 0 and self._rng.random() < self.cfg_drop_rate
        if not prompt and not drop_prompt:
            return self._skip(MISSING_TEXT, sample_id, "empty text-to-image prompt")
        write = ImageWrite(image_token_ids.reshape(-1))
        task = "text_to_image_uncond" if drop_prompt else "text_to_image"
        return self.conversation([Turn("" if drop_prompt else prompt, (write,))], [], task, sample_id)

    def decompression(self, image_token_ids: Tensor | None, sample_id: str = "") -> MLLMSample | None:
        """The compact image in, its h*w*d ids out over T turns (`prompts.decompression` in each user turn)."""
        if image_token_ids is None:
            return self._skip(MISSING_IMAGE, sample_id, "no image to decompress")
        if not self._check_image(image_token_ids, sample_id):
            return None
        turns = self._decompression_turns(image_token_ids)
        return self.conversation(turns, [image_token_ids], "decompression", sample_id, uncompressed_reads=True)

    def _decompression_turns(self, image_token_ids: Tensor) -> list[Turn]:
        """The T turns of a decompression sample: the (h, w, d) image read in the first, its part k written in
        answer to `prompts.decompression` in turn k."""
        segments = split_into_segments(image_token_ids, self.num_segments)
        total = len(segments)
        turns = []
        for k, segment in enumerate(segments):
            ask = self.prompts.decompression.format(part=k + 1, total=total)
            user = (ImageRead(0), ask) if k == 0 else ask
            turns.append(Turn(user, (ImageWrite(segment, opens=k == 0, closes=k == total - 1),)))
        return turns

    def shortest_length(self, task: str) -> int:
        """Tokens of the shortest sample `task` can produce with this template and code shape: the image span
        and the template's fixed text, with a one-word text wherever the data gives text (for up-front
        checks against `max_length` and the LM's positions)."""
        dummy = torch.zeros(self.code_shape, dtype=torch.long)
        if task == "text_to_image":
            turns, images, full = [Turn("", (ImageWrite(dummy.reshape(-1)),))], [], False
        elif task == "decompression":
            turns, images, full = self._decompression_turns(dummy), [dummy], True
        elif task in ("vqa", "caption"):
            question = self.prompts.caption if task == "caption" else "x"
            turns, images, full = [Turn((ImageRead(0), question), "x")], [dummy], False
        else:
            raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
        return len(self._build_strict(turns, images, task, uncompressed_reads=full))

    # ----- prompts for inference ----------------------------------------------------------------

    def text_to_image_prompt(self, prompt: str) -> Tensor:
        """(t,) ids of the generation prompt, ending with `<img>` exactly as training lays it out.

        Use prompt "" for the unconditional branch of classifier-free guidance.
        """
        dummy = torch.full(self.code_shape, -1, dtype=torch.long)  # never emitted: the prompt stops at <img>
        sample = self._build_strict([Turn(prompt, (ImageWrite(dummy.reshape(-1)),))], [], "prompt")
        start = int((sample.input_ids == self.image_start_id).nonzero()[-1, 0])
        return sample.input_ids[: start + 1].clone()

    def question_prompt(self, image_token_ids: Tensor | None, question: str) -> MLLMSample:
        """A one-turn prompt (image, question), ending with the assistant role; labels all IGNORE_INDEX."""
        user = (ImageRead(0), question) if image_token_ids is not None else question
        images = [image_token_ids] if image_token_ids is not None else []
        return self._build_strict([Turn(user, None)], images, "prompt")

    def _build_strict(
        self, turns: Sequence[Turn], images: Sequence[Tensor | None], task: str, uncompressed_reads: bool = False
    ) -> MLLMSample:
        """A build whose every problem raises, whatever `strict` says: an inference prompt or the up-front
        length check has no sample to skip. No length check."""
        strict, self.skips.strict = self.skips.strict, True
        try:
            sample = self._build(turns, images, task, "", check_length=False, uncompressed_reads=uncompressed_reads)
        finally:
            self.skips.strict = strict
        assert sample is not None  # strict builds return a sample or raise
        return sample

    # ----- the general builder -----------------------------------------------------------------

    def conversation(
        self,
        turns: Sequence[Turn],
        images: Sequence[Tensor | None],
        task: str,
        sample_id: str = "",
        *,
        uncompressed_reads: bool = False,
    ) -> MLLMSample | None:
        """Any conversation: `images[i]` (h, w, d) is what `ImageRead(i)` shows. None for a counted skip.

        uncompressed_reads: every read span holds the uncompressed grid (decompression), not the compressed read.
        """
        sample = self._build(turns, images, task, sample_id, check_length=True, uncompressed_reads=uncompressed_reads)
        if sample is not None:
            self.skips.add_built()
        return sample

    def _skip(self, reason: str, sample_id: str, message: str) -> None:
        self.skips.skip(reason, f"sample {sample_id or '?'}: {message}")
        return None

    def _check_image(self, image_token_ids: Tensor, sample_id: str) -> bool:
        if tuple(image_token_ids.shape) != self.code_shape:
            self._skip(
                TEMPLATE_MISMATCH,
                sample_id,
                f"image ids are {tuple(image_token_ids.shape)}, not the code shape {self.code_shape}",
            )
            return False
        return True

    def _build(
        self,
        turns: Sequence[Turn],
        images: Sequence[Tensor | None],
        task: str,
        sample_id: str,
        check_length: bool,
        uncompressed_reads: bool = False,
    ) -> MLLMSample | None:
        """Render the turns, tokenize them, expand each image marker into its span, then check the length (when
        `check_length`); each step returns None after counting a skip (or raises, strict)."""
        rendered = self._render(turns, images, task, sample_id)
        if rendered is None:
            return None
        tokens = self._tokenize(rendered, sample_id)
        if tokens is None:
            return None
        expanded = self._expand_images(*tokens, rendered, images, uncompressed_reads, sample_id)
        if expanded is None:
            return None
        input_ids, is_labelled, read_images, spans = expanded
        if self.template.add_bos and self.text_tokenizer.bos_token_id is not None:
            input_ids = torch.cat([torch.tensor([self.text_tokenizer.bos_token_id]), input_ids])
            is_labelled = torch.cat([torch.tensor([False]), is_labelled])
            spans = [(s + 1, e + 1) for s, e in spans]
        labels = input_ids.masked_fill(~is_labelled, IGNORE_INDEX)
        if check_length:
            fitted = self._fit_length(input_ids, labels, spans, task, sample_id)
            if fitted is None:
                return None
            input_ids, labels = fitted
        h, w, d = self.code_shape
        image_token_ids = torch.stack(read_images) if read_images else torch.zeros(0, h, w, d, dtype=torch.long)
        is_uncompressed = torch.full((len(read_images),), uncompressed_reads, dtype=torch.bool)
        return MLLMSample(input_ids, labels, image_token_ids, task, sample_id, is_uncompressed)

    def _render(
        self, turns: Sequence[Turn], images: Sequence[Tensor | None], task: str, sample_id: str
    ) -> RenderedConversation | None:
        """The template's text of the turns, once every image is there with the code shape, every `ImageRead`
        names one of them and no message holds a special token's text."""
        for image in images:
            if image is None:
                return self._skip(MISSING_IMAGE, sample_id, f"{task} sample without its image")
            if not self._check_image(image, sample_id):
                return None
        try:
            rendered = self.template.render(turns, self.text_tokenizer.eos_token)
        except ValueError as exn:
            return self._skip(TEMPLATE_MISMATCH, sample_id, str(exn))
        for part in rendered.images:
            if isinstance(part, ImageRead) and not 0 <= part.index < len(images):
                return self._skip(TEMPLATE_MISMATCH, sample_id, f"ImageRead({part.index}) but {len(images)} images")
        for turn in turns:
            for message in (turn.user, turn.assistant):
                texts = [message] if isinstance(message, str) else [p for p in message or () if isinstance(p, str)]
                found = sorted({t for text in texts for t in self._reserved_text if t in text})
                if found:
                    return self._skip(TEMPLATE_MISMATCH, sample_id, f"message text contains special tokens {found}")
        return rendered

    def _tokenize(self, rendered: RenderedConversation, sample_id: str) -> tuple[Tensor, Tensor] | None:
        """ids (t,) of the rendered text and labelled (t,) bool: the tokens inside a reply's labelled range."""
        tok = self.text_tokenizer
        encoded = tok(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(encoded["input_ids"], dtype=torch.long)  # (t,)
        offsets = torch.tensor(encoded["offset_mapping"], dtype=torch.long).reshape(-1, 2)  # (t, 2)
        labelled = torch.zeros_like(ids, dtype=torch.bool)
        for start, end in rendered.labelled:
            inside = (offsets[:, 0] >= start) & (offsets[:, 1] <= end)
            straddles = (offsets[:, 0] < end) & (offsets[:, 1] > start) & ~inside
            if bool(straddles.any()):
                where = int(straddles.nonzero()[0, 0])
                return self._skip(
                    TEMPLATE_MISMATCH,
                    sample_id,
                    f"token {tok.convert_ids_to_tokens(int(ids[where]))!r} straddles the start or end of a reply "
                    f"(characters {start}-{end}); the template's separators do not fall on token boundaries",
                )
            labelled |= inside
        return ids, labelled

    def _expand_images(
        self,
        ids: Tensor,
        labelled: Tensor,
        rendered: RenderedConversation,
        images: Sequence[Tensor | None],
        uncompressed_reads: bool,
        sample_id: str,
    ) -> tuple[Tensor, Tensor, list[Tensor], list[tuple[int, int]]] | None:
        """Each image marker of `ids` (t,) expanded into its span: read slots (never labelled) or written ids
        (labelled as the reply is). Returns (input_ids (t',), labelled (t',), the (h, w, d) images read in span
        order, [start, end) of every image span with its `<img>`/`</img>`)."""
        markers = (ids == self.image_marker_id).nonzero()[:, 0].tolist()
        if len(markers) != len(rendered.images):
            return self._skip(
                TEMPLATE_MISMATCH,
                sample_id,
                f"{len(markers)} image markers among the tokens for {len(rendered.images)} images",
            )
        pieces_ids: list[Tensor] = []
        pieces_labelled: list[Tensor] = []
        read_images: list[Tensor] = []
        spans: list[tuple[int, int]] = []  # [start, end) of every image span in the final sequence
        prev, length = 0, 0
        for marker, part in zip(markers, rendered.images, strict=True):
            pieces_ids.append(ids[prev:marker])
            pieces_labelled.append(labelled[prev:marker])
            length += marker - prev
            if isinstance(part, ImageRead):
                slots = self.uncompressed_tokens_per_image if uncompressed_reads else self.tokens_per_image
                span = torch.full((slots,), IMAGE_PLACEHOLDER_ID, dtype=torch.long)
                span_labelled = torch.zeros(slots, dtype=torch.bool)
                read_images.append(images[part.index].long())
            else:
                span = part.token_ids.long().reshape(-1)
                span_labelled = torch.full_like(span, bool(labelled[marker]), dtype=torch.bool)
            pieces_ids.append(span)
            pieces_labelled.append(span_labelled)
            # The `<img>` before a span and `</img>` after it belong to the image: a cut there is a cut through it.
            opens = marker > 0 and int(ids[marker - 1]) == self.image_start_id
            closes = marker + 1 < len(ids) and int(ids[marker + 1]) == self.image_end_id
            spans.append((length - int(opens), length + span.numel() + int(closes)))
            length += span.numel()
            prev = marker + 1
        pieces_ids.append(ids[prev:])
        pieces_labelled.append(labelled[prev:])
        return torch.cat(pieces_ids), torch.cat(pieces_labelled), read_images, spans

    def _fit_length(
        self, input_ids: Tensor, labels: Tensor, spans: Sequence[tuple[int, int]], task: str, sample_id: str
    ) -> tuple[Tensor, Tensor] | None:
        """(input_ids, labels) within max_length (`overflow`: skip, or truncate but never through an image span),
        with at least one labelled token left."""
        if len(input_ids) > self.max_length:
            if self.overflow == "skip":
                return self._skip(
                    TOO_LONG, sample_id, f"{task} sample has {len(input_ids)} tokens, max_length is {self.max_length}"
                )
            cut = self.max_length
            through = [(s, e) for s, e in spans if s < cut < e]
            if through:
                s, e = through[0]
                raise SampleError(
                    TOO_LONG,
                    f"sample {sample_id or '?'}: truncating {len(input_ids)} tokens to max_length {cut} would cut "
                    f"through the image span at tokens {s}-{e}; raise max_length",
                )
            input_ids, labels = input_ids[:cut], labels[:cut]
            self.skips.truncated += 1
        if not bool((labels != IGNORE_INDEX).any()):
            return self._skip(NO_LABELS, sample_id, f"{task} sample has no labelled token")
        return input_ids, labels


# The collated keys `UniCodeMLLM.forward` takes: `model(**{k: batch[k] for k in MODEL_INPUTS})`.
MODEL_INPUTS: tuple[str, ...] = (
    "input_ids",
    "attention_mask",
    "labels",
    "image_token_ids",
    "images_per_sample",
    "image_is_uncompressed",
)


@dataclass(frozen=True)
class MLLMCollator:
    """Pads `MLLMSample`s into a batch: right padding for training, left for batched generation.

    Returns {"input_ids": (b, t), "attention_mask": (b, t) (1 = real token), "labels": (b, t)
    (IGNORE_INDEX on padding), "image_token_ids": (n, h, w, d) all images read, row by row,
    "images_per_sample": (b,), "image_is_uncompressed": (n,) bool, "tasks": list[str], "sample_ids": list[str]}.
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, samples: Sequence[MLLMSample]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        if any(s is None for s in samples):
            raise TypeError("a batch holds None: drop skipped samples before collating (the builder counted them)")
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        length = max(len(s) for s in samples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(samples)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s)
            cols = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[row, cols] = s.input_ids
            labels[row, cols] = s.labels
            attention_mask[row, cols] = 1
        images_per_row = [s.image_token_ids.shape[0] for s in samples]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **image_fields(samples, images_per_row),
        }


def image_fields(samples: Sequence[MLLMSample], images_per_row: Sequence[int]) -> dict[str, Any]:
    """A batch's image and bookkeeping entries for `samples` in row order (collators with one or several samples a
    row): image_token_ids (n, h, w, d) of every image in order, images_per_sample (rows,), image_is_uncompressed
    (n,), tasks and sample_ids. Raises ValueError for images of different code shapes in one batch."""
    shapes = {tuple(s.image_token_ids.shape[1:]) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"samples hold images of different code shapes {sorted(shapes)}")
    return {
        "image_token_ids": torch.cat([s.image_token_ids for s in samples]),
        "images_per_sample": torch.tensor(list(images_per_row), dtype=torch.long),
        "image_is_uncompressed": torch.cat([s.image_is_uncompressed for s in samples]),
        "tasks": [s.task for s in samples],
        "sample_ids": [s.sample_id for s in samples],
    }
