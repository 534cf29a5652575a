"""Text about a `Scene`: captions, question/answer pairs, drawing instructions and the instruction parser.

Conventions (shared by every text the world writes and by the scorer):
- an object is written `<size> <colour> <shape> <position phrase>`, e.g. "large red circle at the top
  left"; objects come in reading order of their cells;
- positions are the nine names of `POSITIONS` ("top left", "top", ..., "center", ..., "bottom right");
  in sentences they read "at the top left", "on the left", "in the center" (`POSITION_PHRASES`);
- answers are short lower-case strings for exact-match scoring; counts are number words ("zero",
  "one", "two", "three"), never digits.
"""

from __future__ import annotations

import re
import typing
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from unicode_mllm.data.shapes.config import BACKGROUND_COLOURS, OBJECT_COLOURS, POSITIONS, SHAPE_NAMES, SIZE_NAMES
from unicode_mllm.data.shapes.scene import Scene, SceneObject
from unicode_mllm.errors import UserError

POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
assert tuple(POSITION_PHRASES) == POSITIONS, "POSITION_PHRASES must cover POSITIONS in order"

COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS: dict[str, str] = {"cross": "crosses"}  # every other shape takes a plain 's'

QAKind = Literal["colour", "shape", "size", "count", "position", "exists", "background"]
QA_KINDS: tuple[str, ...] = typing.get_args(QAKind)

# The instruction templates; a sample picks one with its own RNG. Each must stay parseable.
INSTRUCTION_TEMPLATES: tuple[str, ...] = (
    "Draw {objects} on a {background} background.",
    "Paint {objects} on a {background} background.",
    "Make a picture of {objects} on a {background} background.",
)
# Words the parser skips between object phrases (template words and glue).
_FILLER = frozenset({"draw", "paint", "make", "picture", "image", "photo", "of", "a", "an", "and", "the", "with"})


@dataclass(frozen=True)
class QAPair:
    """One question about an image with its exact-match answer and the kind of fact it asks about."""

    question: str
    answer: str
    kind: QAKind

    def to_dict(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer, "kind": self.kind}


def count_word(n: int) -> str:
    """3 -> 'three' (the count answer format)."""
    if not 0 <= n < len(COUNT_WORDS):
        raise ValueError(f"count {n} has no number word; counts run from 0 to {len(COUNT_WORDS) - 1}")
    return COUNT_WORDS[n]


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def object_phrase(obj: SceneObject) -> str:
    """'large red circle at the top left' (size and position left out when None)."""
    words = [obj.size, obj.colour, obj.shape, POSITION_PHRASES[obj.position] if obj.position else None]
    return " ".join(w for w in words if w)


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene) -> str:
    """One sentence listing every object, e.g.
    'A large red circle at the top left and a small blue square in the center, on a black background.'
    """
    if not scene.objects:
        return f"An empty {scene.background} background."
    text = _join([f"a {object_phrase(o)}" for o in scene.objects])
    return f"{text[0].upper()}{text[1:]}, on a {scene.background} background."


def instruction(scene: Scene, template: int = 0) -> str:
    """A drawing instruction naming every object's size, colour, shape and position and the background."""
    objects = _join([f"a {object_phrase(o)}" for o in scene.objects])
    return INSTRUCTION_TEMPLATES[template].format(objects=objects, background=scene.background)


def questions(
    scene: Scene, rng: np.random.Generator, shapes: Sequence[str], pairs: Sequence[tuple[str, str]]
) -> list[QAPair]:
    """Question/answer pairs that `scene` answers unambiguously.

    Kinds: `colour` (of a shape that appears once), `shape` (of a colour that appears once), `size` and
    `position` (of a colour+shape pair that appears once), `count` (all objects; one present shape; one
    absent shape of `shapes`, answer "zero"), `exists` (one present pair -> "yes", one pair of `pairs`
    that is absent -> "no"), `background`. `pairs` lists the (colour, shape) pairs a "no" question may
    name, so train questions never mention a held-out pair.
    """
    objs = scene.objects
    shape_counts = Counter(o.shape for o in objs)
    colour_counts = Counter(o.colour for o in objs)
    pair_counts = Counter(o.pair for o in objs)
    qa: list[QAPair] = []
    for o in objs:
        if shape_counts[o.shape] == 1:
            qa.append(QAPair(f"What colour is the {o.shape}?", o.colour, "colour"))
    for o in objs:
        if colour_counts[o.colour] == 1:
            qa.append(QAPair(f"What shape is the {o.colour} object?", o.shape, "shape"))
    for o in objs:
        if pair_counts[o.pair] == 1:
            qa.append(QAPair(f"What size is the {o.colour} {o.shape}?", o.size, "size"))
            qa.append(QAPair(f"Where is the {o.colour} {o.shape}?", o.position, "position"))
    qa.append(QAPair("How many objects are there?", count_word(len(objs)), "count"))
    present_shapes = sorted(shape_counts)
    if present_shapes:
        shape = present_shapes[rng.integers(len(present_shapes))]
        qa.append(QAPair(f"How many {plural(shape)} are there?", count_word(shape_counts[shape]), "count"))
    absent_shapes = [s for s in shapes if s not in shape_counts]
    if absent_shapes:
        shape = absent_shapes[rng.integers(len(absent_shapes))]
        qa.append(QAPair(f"How many {plural(shape)} are there?", count_word(0), "count"))
    present_pairs = sorted(pair_counts)
    if present_pairs:
        colour, shape = present_pairs[rng.integers(len(present_pairs))]
        qa.append(QAPair(f"Is there a {colour} {shape}?", "yes", "exists"))
    absent_pairs = [p for p in pairs if p not in pair_counts]
    if absent_pairs:
        colour, shape = absent_pairs[rng.integers(len(absent_pairs))]
        qa.append(QAPair(f"Is there a {colour} {shape}?", "no", "exists"))
    qa.append(QAPair("What colour is the background?", str(scene.background), "background"))
    return qa


def _alternation(words: Sequence[str]) -> str:
    # Longest first, so "at the top left" wins over "at the top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT_RE = re.compile(
    rf"\b(?:(?P<size>{_alternation(SIZE_NAMES)})\s+)?(?P<colour>{_alternation(tuple(OBJECT_COLOURS))})\s+"
    rf"(?P<shape>{_alternation(SHAPE_NAMES)})\b(?:\s+(?P<position>{_alternation(tuple(POSITION_PHRASES.values()))})\b)?"
)
_BACKGROUND_RE = re.compile(rf"\bon\s+an?\s+(?P<background>{_alternation(tuple(BACKGROUND_COLOURS))})\s+background\b")
_PHRASE_TO_POSITION = {phrase: name for name, phrase in POSITION_PHRASES.items()}


def _trim_filler(piece: str) -> str:
    words = piece.split()
    while words and words[0] in _FILLER:
        words.pop(0)
    while words and words[-1] in _FILLER:
        words.pop()
    return " ".join(words)


def parse_instruction(text: str) -> Scene:
    """Read a drawing instruction (or caption) back into the `Scene` it asks for.

    Every object is `[<size>] <colour> <shape> [<position phrase>]`; an omitted size or position is None
    ("any"). The background is "on a <colour> background" and may be omitted (None). Objects keep the
    order of the text. Round-trips every caption and instruction the world writes.

    Raises UserError naming the words it could not read, when no object is named, or when two
    backgrounds are.
    """
    lowered = text.lower()
    backgrounds = list(_BACKGROUND_RE.finditer(lowered))
    if len(backgrounds) > 1:
        names = [m["background"] for m in backgrounds]
        raise UserError(f"instruction {text!r} names {len(names)} backgrounds {names}; name at most one")
    rest = _BACKGROUND_RE.sub(" ", lowered)
    objects = [
        SceneObject(
            shape=m["shape"],
            colour=m["colour"],
            size=m["size"],
            position=_PHRASE_TO_POSITION[m["position"]] if m["position"] else None,
        )
        for m in _OBJECT_RE.finditer(rest)
    ]
    # What the object phrases did not cover, cut at the phrases and at punctuation.
    pieces = re.split(r"[\x00,.;:!?]", _OBJECT_RE.sub("\x00", rest))
    leftover = [_trim_filler(p) for p in pieces if set(re.findall(r"[a-z0-9]+", p)) - _FILLER]
    if leftover:
        raise UserError(
            f"instruction {text!r}: cannot read {' / '.join(leftover)!r}; write each object as "
            f"'<size> <colour> <shape> <position>' with sizes {list(SIZE_NAMES)}, colours "
            f"{list(OBJECT_COLOURS)}, shapes {list(SHAPE_NAMES)} and positions like 'at the top left'"
        )
    if not objects:
        raise UserError(f"instruction {text!r} names no object; write e.g. 'Draw a large red circle at the top left'")
    return Scene(objects=tuple(objects), background=backgrounds[0]["background"] if backgrounds else None)
