"""Conversation templates: a registry of dataclasses that render turns to text with labelled ranges.

A template turns a conversation (user / assistant message pairs) into one string and the character
ranges of the assistant replies, which are the only parts trained on. Images appear in the text as
markers made of the multimodal sentinels; `data/mllm_samples.py` tokenizes the string once and swaps
each `<image>` marker for the image's span:

    read an image  (the LLM sees it):    <img><image></img>   -> <img> + s placeholder slots + </img>
    write an image (the LLM emits it):   <img><image></img>   -> <img> + the code token ids + </img>

The `plain` template is the format of the tiny LM's corpus (`stages/lm/corpus.py`, `sample_document`):
`USER: question ASSISTANT: answer`, one exchange per line, the document closed by `</s>`. `vicuna_v1`
is the Vicuna v1.1 format LLaVA-1.5 trains with (a system line, `USER:`/`ASSISTANT:`, `</s>` after
every reply). After haotian-liu/LLaVA (`llava/conversation.py`, `conv_vicuna_v1`); templates are
looked up by name, never guessed from a model name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from unicode_mllm.constants import ASSISTANT_PREFIX, IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START, USER_PREFIX
from unicode_mllm.errors import UserError

EOS = "{eos}"  # stands for the text tokenizer's eos token in a template's text


@dataclass(frozen=True)
class ImageRead:
    """The LLM reads image `index` of the sample here (as `<img>` + placeholder slots + `</img>`)."""

    index: int = 0


@dataclass(frozen=True, eq=False)
class ImageWrite:
    """The assistant writes these LLM token ids (k,), opened by `<img>` and closed by `</img>` if asked.

    A whole image is one `ImageWrite` with both flags; decompression turns write one segment each.
    """

    token_ids: Tensor
    opens: bool = True
    closes: bool = True


Part = str | ImageRead | ImageWrite
Message = str | Sequence[Part]


@dataclass(frozen=True)
class Turn:
    """One exchange; `assistant` is None only for a generation prompt's last turn."""

    user: Message
    assistant: Message | None


@dataclass(frozen=True)
class RenderedConversation:
    """text: the whole conversation; labelled: [start, end) character ranges that are trained on;
    images: the image parts in the order their `<image>` markers appear in `text`."""

    text: str
    labelled: tuple[tuple[int, int], ...]
    images: tuple[ImageRead | ImageWrite, ...]


@dataclass(frozen=True)
class ConversationTemplate:
    """How turns become text. The labelled range of a reply runs from `role_sep` to its end marker."""

    name: str
    system: str = ""
    system_end: str = " "  # between the system message and the first user role
    user_role: str = USER_PREFIX
    assistant_role: str = ASSISTANT_PREFIX
    role_sep: str = " "  # between a role and a non-empty message
    user_end: str = " "  # after a user message, before the assistant role
    assistant_end: str = "\n"  # after every reply but the last (trained on)
    final_end: str = EOS  # after the last reply (trained on)
    image_sep: str = " "  # between an image the user shows and the text after it
    add_bos: bool = True  # start with the text tokenizer's bos token, when it has one
    # Strings a message may not contain: they would be read as markers or special tokens.
    reserved: tuple[str, ...] = field(default=(IMAGE_START, IMAGE_END, IMAGE_PLACEHOLDER))

    def _render_message(self, message: Message, images: list[ImageRead | ImageWrite]) -> str:
        parts: Sequence[Part] = (message,) if isinstance(message, str) else message
        text = ""
        for i, part in enumerate(parts):
            if isinstance(part, str):
                found = [r for r in self.reserved if r in part]
                if found:
                    raise ValueError(f"message text contains the reserved strings {found}: {part[:60]!r}")
                text += part
            elif isinstance(part, ImageRead):
                images.append(part)
                if text and not text[-1].isspace():  # text before the image (LLaVA's "question\n<image>")
                    text += self.image_sep
                text += IMAGE_START + IMAGE_PLACEHOLDER + IMAGE_END
                if i + 1 < len(parts) and isinstance(parts[i + 1], str) and parts[i + 1]:
                    text += self.image_sep
            elif isinstance(part, ImageWrite):
                images.append(part)
                text += (IMAGE_START if part.opens else "") + IMAGE_PLACEHOLDER + (IMAGE_END if part.closes else "")
            else:
                raise TypeError(f"a message part must be str, ImageRead or ImageWrite, got {type(part).__name__}")
        return text

    def render(self, turns: Sequence[Turn], eos_token: str) -> RenderedConversation:
        """Turns -> text with labelled ranges. The last turn may leave `assistant` None (a prompt).

        Raises ValueError for an empty conversation, a missing reply before the last turn, or a
        message holding a reserved string.
        """
        if not turns:
            raise ValueError("a conversation needs at least one turn")
        images: list[ImageRead | ImageWrite] = []
        labelled: list[tuple[int, int]] = []
        text = self.system + self.system_end if self.system else ""
        for i, turn in enumerate(turns):
            last = i == len(turns) - 1
            user = self._render_message(turn.user, images)
            text += self.user_role + (self.role_sep + user if user else "") + self.user_end + self.assistant_role
            if turn.assistant is None:
                if not last:
                    raise ValueError(f"turn {i} has no reply but is not the last turn")
                break
            start = len(text)
            reply = self._render_message(turn.assistant, images)
            end_marker = self.final_end if last else self.assistant_end
            text += (self.role_sep + reply if reply else "") + end_marker.replace(EOS, eos_token)
            labelled.append((start, len(text)))
        return RenderedConversation(text, tuple(labelled), tuple(images))


CONVERSATION_TEMPLATES: dict[str, ConversationTemplate] = {}


def register_template(template: ConversationTemplate) -> ConversationTemplate:
    """Add a template to the registry. Raises ValueError when its name is taken."""
    if template.name in CONVERSATION_TEMPLATES:
        raise ValueError(f"conversation template {template.name!r} is already registered")
    CONVERSATION_TEMPLATES[template.name] = template
    return template


def get_template(name: str) -> ConversationTemplate:
    """The registered template called `name`. Raises UserError listing the known names."""
    try:
        return CONVERSATION_TEMPLATES[name]
    except KeyError:
        raise UserError(
            f"conversation template {name!r} is unknown; choose one of {sorted(CONVERSATION_TEMPLATES)}"
        ) from None


PLAIN = register_template(ConversationTemplate(name="plain"))
VICUNA_V1 = register_template(
    ConversationTemplate(
        name="vicuna_v1",
        system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        assistant_end=EOS,
        final_end=EOS,
        image_sep="\n",
    )
)
