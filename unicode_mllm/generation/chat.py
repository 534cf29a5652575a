"""A multi-turn conversation with the model: questions (with attached images), answers and drawings.

The history is kept as template turns, so every new prompt renders the whole conversation in the
model's own template, as the multi-turn training samples do: an attached image is read at the start of
the next user turn, an answer is an assistant reply, and a drawing is an assistant reply that writes
`<img>` + its h*w*d ids + `</img>`. Classifier-free guidance of a drawing uses the empty single-turn
prompt as its unconditional branch, the prompt the training data drops to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from unicode_mllm.data.conversation import ImageRead, ImageWrite, Turn
from unicode_mllm.errors import UserError
from unicode_mllm.generation.answering import DEFAULT_MAX_NEW_TOKENS, StreamCallback, generate_answers
from unicode_mllm.generation.guidance import check_cfg_scale
from unicode_mllm.generation.image_generation import (
    ImageGeneration,
    decode_token_ids,
    generate_image_sequences,
)
from unicode_mllm.generation.image_inputs import ImageInput, images_to_token_ids
from unicode_mllm.generation.prompts import check_prompt_text, conversation_prompt, max_positions, prompt_builder
from unicode_mllm.generation.sampling import SamplingSettings, resolve_seed, row_seed
from unicode_mllm.token_layout import grid_to_sequence, sequence_to_grid

if TYPE_CHECKING:
    from unicode_mllm.model.mllm import UniCodeMLLM


@dataclass(frozen=True)
class ChatSettings:
    """Text replies: greedy by default; drawings: sampled at temperature 1 (greedy gives flat images)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    image_temperature: float = 1.0
    image_top_k: int | None = None
    image_top_p: float | None = None
    cfg_scale: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # Checked once here (the CLI does so before loading the model), not on every message of the session.
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        SamplingSettings(self.temperature, self.top_k, self.top_p)
        SamplingSettings(self.image_temperature, self.image_top_k, self.image_top_p)
        check_cfg_scale(self.cfg_scale)
        if self.seed is not None:
            resolve_seed(self.seed)


class ChatSession:
    """Keeps a conversation's turns and the images it reads; `ask` and `draw` each add one turn.

    Raises UserError (and leaves the history unchanged) for an empty message, a bad image, or a
    conversation grown past the LM's positions (`reset` starts over).
    """

    def __init__(self, model: UniCodeMLLM, settings: ChatSettings | None = None):
        self.model = model
        self.settings = settings or ChatSettings()
        self.builder = prompt_builder(model)
        # One request seed for the session; each reply or drawing takes the next row index, so a replayed
        # session with the same seed gives the same conversation.
        self.seed = resolve_seed(self.settings.seed)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and any attached image."""
        self.turns: list[Turn] = []
        self.images: list[Tensor] = []  # (h, w, d) token ids of the images read, by ImageRead index
        self.pending_image: Tensor | None = None
        self._requests = 0

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    def attach_image(self, image: ImageInput) -> None:
        """Show `image` (a path, PIL image, pixel tensor or token ids) with the next message."""
        (ids,) = images_to_token_ids(self.model, [image])
        self.pending_image = ids

    def _user_message(self, text: str) -> tuple[list[Tensor], object]:
        if self.pending_image is None:
            return self.images, text
        return [*self.images, self.pending_image], (ImageRead(len(self.images)), text)

    def _check_room(self, prompt_length: int, needed: int, what: str) -> None:
        """In a conversation the fix for a prompt past the LM's positions is /reset, not a shorter message."""
        limit = max_positions(self.model.lm)
        if self.turns and limit is not None and prompt_length + needed > limit:
            raise UserError(
                f"the conversation is full: {what} needs {prompt_length + needed} of the LM's {limit} positions; "
                "/reset to start a new conversation"
            )

    def _next_seed(self) -> int:
        self._requests += 1
        return row_seed(self.seed, self._requests)

    def ask(self, text: str, stream: StreamCallback | None = None) -> str:
        """Answer `text` (about the attached image, if any) given the conversation so far."""
        text = check_prompt_text(text, "message")
        images, user = self._user_message(text)
        prompt = conversation_prompt(self.builder, [*self.turns, Turn(user, None)], images)
        self._check_room(len(prompt), 1, "this message")
        s = self.settings
        (answer,) = generate_answers(
            self.model,
            [prompt],
            stream=stream,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            seed=self._next_seed(),
        )
        self.turns.append(Turn(user, answer.text))
        self.images, self.pending_image = images, None
        return answer.text

    def draw(self, text: str) -> ImageGeneration:
        """Draw `text` given the conversation so far; the drawing joins the history as a written image."""
        text = check_prompt_text(text, "drawing prompt")
        images, user = self._user_message(text)
        placeholder = torch.full((self.model.num_write_tokens,), -1, dtype=torch.long)  # cut off at its <img> below
        sample = conversation_prompt(self.builder, [*self.turns, Turn(user, (ImageWrite(placeholder),))], images)
        start = int((sample.input_ids == self.model.token_ids.image_start).nonzero()[-1, 0])
        sample.input_ids, sample.labels = sample.input_ids[: start + 1], sample.labels[: start + 1]
        self._check_room(len(sample), self.model.num_write_tokens + 1, "this drawing")
        s = self.settings
        sampling = SamplingSettings(s.image_temperature, s.image_top_k, s.image_top_p)
        seed = self._next_seed()
        sequences, request_seed, seeds = generate_image_sequences(
            self.model, [sample], sampling=sampling, cfg_scale=s.cfg_scale, seed=seed
        )
        token_ids = sequence_to_grid(sequences[:, :-1], self.model.code_shape)  # (1, h, w, d)
        self.turns.append(Turn(user, (ImageWrite(grid_to_sequence(token_ids[0])),)))
        self.images, self.pending_image = images, None
        return ImageGeneration(
            prompts=[text],
            token_ids=token_ids,
            sequences=sequences,
            seed=request_seed,
            seeds=seeds,
            pixel_values=decode_token_ids(self.model, token_ids),
        )

    def draw_image(self, text: str) -> Image.Image:
        """`draw`, returning the PIL image only."""
        return self.draw(text).images[0]
