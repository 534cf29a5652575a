"""The image-span constraint: what the LLM may emit inside and outside an image it writes.

An image is written as `<img>` + exactly h*w*d visual-code token ids + `</img>` (`token_layout.py`). Each row
of a batch carries one integer of state:

    OUTSIDE (-1)   in text: the ids a text reply may never hold are banned (`</img>`, `<image>`, pad,
                   bos, rows past the text vocabulary), `<img>` too unless images are allowed;
    k in [0, n)    inside a span after k codes: only visual-code token ids are allowed;
    n = h*w*d      the span is full: only `</img>` is allowed (forced), after which the row is OUTSIDE.

A text-to-image decode starts inside the span (its prompt ends with `<img>`) and an answer starts
outside. The visual-code ids are the LM vocabulary ids in `visual_tokenizer.code_to_token_id`: with a
codebook shared with language they are ordinary text ids, so the span constraint restricts what is
allowed inside an image and never bans codes from text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from unicode_mllm.model.mllm import UniCodeMLLM

OUTSIDE = -1


class ImageSpanConstraint:
    """Masks logits so that image spans hold exactly `span_length` codes and close with `</img>`.

    code_token_ids: (v,) LLM token ids of the visual codes; vocab_size: V, the LM's logit width.
    banned_in_text: ids never allowed outside a span (e.g. pad, bos, `<image>`); `</img>` is always
        banned there, and `<img>` unless `allow_image_start`.
    Raises ValueError when a code id is outside [0, V) or collides with `<img>`/`</img>`.
    """

    def __init__(
        self,
        code_token_ids: Tensor,
        *,
        image_start_id: int,
        image_end_id: int,
        span_length: int,
        vocab_size: int,
        banned_in_text: Iterable[int] = (),
        allow_image_start: bool = False,
    ):
        code_token_ids = torch.as_tensor(code_token_ids, dtype=torch.long).reshape(-1).cpu()
        if span_length < 1:
            raise ValueError(f"span_length (h*w*d) must be >= 1, got {span_length}")
        if code_token_ids.numel() == 0:
            raise ValueError("no visual-code token ids: an image span could hold nothing")
        if int(code_token_ids.min()) < 0 or int(code_token_ids.max()) >= vocab_size:
            raise ValueError(
                f"visual-code token ids span [{int(code_token_ids.min())}, {int(code_token_ids.max())}] but the LM "
                f"has {vocab_size} logits"
            )
        for name, i in (("<img>", image_start_id), ("</img>", image_end_id)):
            if not 0 <= i < vocab_size:
                raise ValueError(f"{name} id {i} is outside the LM's {vocab_size} logits")
            if bool((code_token_ids == i).any()):
                raise ValueError(f"{name} id {i} is also a visual-code token id")
        self.image_start_id = int(image_start_id)
        self.image_end_id = int(image_end_id)
        self.span_length = int(span_length)
        self.vocab_size = int(vocab_size)
        self.allow_image_start = allow_image_start

        self.is_code = torch.zeros(vocab_size, dtype=torch.bool)  # (V,)
        self.is_code[code_token_ids] = True
        self.text_allowed = torch.ones(vocab_size, dtype=torch.bool)  # (V,)
        banned = [i for i in banned_in_text if 0 <= i < vocab_size]
        self.text_allowed[torch.tensor(banned, dtype=torch.long)] = False
        self.text_allowed[self.image_end_id] = False
        self.text_allowed[self.image_start_id] = allow_image_start
        self.close_only = torch.zeros(vocab_size, dtype=torch.bool)  # (V,)
        self.close_only[self.image_end_id] = True
        self._device_masks: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def initial_state(self, batch_size: int, inside: bool, device: torch.device | str = "cpu") -> Tensor:
        """(b,) long: 0 (inside a span just opened by the prompt's `<img>`) or OUTSIDE."""
        return torch.full((batch_size,), 0 if inside else OUTSIDE, dtype=torch.long, device=device)

    def _masks(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        # Copied to each device once, not once per decoding step.
        if device not in self._device_masks:
            self._device_masks[device] = tuple(m.to(device) for m in (self.text_allowed, self.close_only, self.is_code))
        return self._device_masks[device]

    def allowed(self, state: Tensor) -> Tensor:
        """(b,) state -> (b, V) bool, True where a token may come next."""
        text_allowed, close_only, is_code = self._masks(state.device)
        outside = (state == OUTSIDE)[:, None]
        full = (state >= self.span_length)[:, None]
        return torch.where(outside, text_allowed, torch.where(full, close_only, is_code))

    def apply(self, logits: Tensor, state: Tensor) -> Tensor:
        """(b, V) logits -> (b, V) with -inf on every token the state forbids (a new tensor)."""
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits are {logits.shape[-1]} wide but the constraint covers {self.vocab_size} ids")
        return logits.masked_fill(~self.allowed(state), float("-inf"))

    def advance(self, state: Tensor, token_ids: Tensor) -> Tensor:
        """(b,) state and the (b,) ids just emitted -> the next (b,) state.

        Raises ValueError naming the row when an id was not allowed (sampling ignored the mask).
        """
        ok = self.allowed(state).gather(-1, token_ids[:, None].long())[:, 0]
        if not bool(ok.all()):
            row = int((~ok).nonzero()[0, 0])
            raise ValueError(
                f"row {row} emitted token id {int(token_ids[row])}, which the image-span constraint forbids in "
                f"state {int(state[row])}"
            )
        inside = state != OUTSIDE
        opened = ~inside & (token_ids == self.image_start_id)
        closed = inside & (state >= self.span_length)  # the one allowed id there was `</img>`
        nxt = torch.where(inside, state + 1, state)
        nxt = torch.where(opened, torch.zeros_like(state), nxt)
        return torch.where(closed, torch.full_like(state, OUTSIDE), nxt)

    def is_complete(self, state: Tensor) -> Tensor:
        """(b,) bool: the span holds all `span_length` codes and only `</img>` may follow."""
        return state >= self.span_length


def text_banned_token_ids(model: UniCodeMLLM, vocab_size: int) -> list[int]:
    """Ids a text reply of `model` may never hold: pad, bos, `<image>`, and every id past the text vocabulary.

    Ids past `len(text_tokenizer)` are padding rows of the LM or codes of a `separate` codebook: neither
    decodes to text. eos is never banned, even where pad or bos share its id.
    """
    ids = model.token_ids
    banned = {ids.pad, ids.image_placeholder} | ({ids.bos} if ids.bos is not None else set())
    banned.discard(ids.eos)
    banned |= set(range(len(model.text_tokenizer), vocab_size))
    return sorted(banned)


def image_span_constraint(model: UniCodeMLLM, vocab_size: int, *, allow_image_start: bool) -> ImageSpanConstraint:
    """The constraint for `model`: its code ids, `<img>`/`</img>`, h*w*d codes per span (the tokenizer's count)."""
    return ImageSpanConstraint(
        model.visual_tokenizer.code_to_token_id,
        image_start_id=model.token_ids.image_start,
        image_end_id=model.token_ids.image_end,
        span_length=model.num_write_tokens,
        vocab_size=vocab_size,
        banned_in_text=text_banned_token_ids(model, vocab_size),
        allow_image_start=allow_image_start,
    )
