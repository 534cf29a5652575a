"""Answer normalisation for exact-match VQA scoring."""

from __future__ import annotations

import re
import string

ARTICLES = frozenset({"a", "an", "the"})
# Number words are written as digits, as the VQAv2 evaluation does, so "three" matches "3".
NUMBER_WORDS: dict[str, str] = {
    w: str(i)
    for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))
}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_answer(text: str) -> str:
    """The form answers are compared in.

    Lower-case; apostrophes dropped ("don't" -> "dont"); every other ASCII punctuation character
    replaced by a space ("top-left." -> "top left"); the articles "a", "an", "the" removed; the
    number words zero..ten written as digits; whitespace collapsed to single spaces and trimmed.
    """
    text = text.lower().replace("'", "")
    words = _PUNCTUATION.sub(" ", text).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def is_correct(prediction: str, answers: list[str]) -> bool:
    """Exact match of the normalised prediction with any normalised reference answer."""
    predicted = normalise_answer(prediction)
    return any(predicted == normalise_answer(a) for a in answers)
