"""VQAv2 accuracy, as the official evaluation code computes it.

Source: GT-Vision-Lab/VQA, `PythonEvaluationTools/vqaEvaluation/vqaEval.py` (`VQAEval.evaluate`,
`processPunctuation`, `processDigitArticle`, `setAccuracy`). The tables and rules below are that file's;
the code is ours.

One question (`vqav2_accuracy`):

1. Every answer, the humans' and the prediction, has newlines and tabs replaced by spaces and is stripped.
2. Only when the human answers are not all the same string are the human answers AND the prediction
   normalised (`normalise_vqav2_answer`: punctuation, then number words, articles and contractions). When
   every human gave the same string, the prediction is compared with it as it stands, case and punctuation
   included: that is what the official code does (`if len(set(gtAnswers)) > 1:`), so "Yes" against ten
   "yes" scores 0, and "1000" against ten "1,000" scores 0.
3. Leave out each human answer in turn: on the other N-1 the prediction scores min(#equal answers / 3, 1).
   The accuracy is the mean over the N subsets. With ten answers of which k equal the prediction: k = 0 -> 0,
   1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.

Over many questions (`VQAv2Scores`): overall = the mean over questions; per answer type ("yes/no", "number",
"other") and per question type = the mean over its questions. The official code reports each x 100, rounded
to 2 decimals by Python 2's round() (`official()`); `to_dict()` keeps full precision next to that block.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

OFFICIAL_DECIMALS = 2  # VQAEval(n=2)

# processDigitArticle's manualMap: number words (and "none") as digits.
MANUAL_MAP: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# processDigitArticle's contractions, as listed there. The words are lower-cased before the look-up, so the
# capitalised keys ("Im", "Ive", "Id've", "I'dve") never match, there or here; "somebody'd" maps to
# "somebodyd" there too.
# fmt: off
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# fmt: on

# processPunctuation's characters, in its order. The apostrophe, '.' and ':' are not among them.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Its commaStrip: a comma between two digits anywhere in the answer makes every punctuation character vanish
# (instead of becoming a space), so "1,000" -> "1000".
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# Its periodStrip, "(?!<=\d)(\.)(?!\d)": the leading "(?!<=\d)" is a look-ahead for the text "<=" + digit,
# which never matches at a '.', so the rule is "delete every '.' not followed by a digit" ("3.5" keeps its).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# It calls periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) lands in sub()'s `count`, so at most 32 go.
_PERIOD_STRIP_COUNT = 32


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip (done to every answer before anything else)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """processPunctuation: each punctuation character is deleted when it touches a space somewhere in the
    answer ("yes, it is" -> "yes it is") or when a comma sits between digits anywhere in it ("1,000" ->
    "1000"), else replaced by a space ("t-shirt" -> "t shirt"); then periods not before a digit are deleted."""
    out = text
    comma_between_digits = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:  # the conditions test the input, not the text replaced so far, as there
        out = out.replace(p, "" if p + " " in text or " " + p in text or comma_between_digits else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """processDigitArticle: lower-case, split on whitespace, number words to digits (MANUAL_MAP, "none" ->
    "0"), drop the articles a/an/the, expand contractions ("dont" -> "don't"), join with single spaces."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalise_vqav2_answer(text: str) -> str:
    """The official normalisation of one answer: whitespace, punctuation, then digits/articles/contractions."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official accuracy of `prediction` against the human `answers` (usually ten), in [0, 1].

    See the module docstring; the loop and the float sums are the official code's, so the value is the same
    float. Raises ValueError for an empty `answers`.
    """
    if not answers:
        raise ValueError("vqav2_accuracy needs at least one human answer")
    humans = [clean_whitespace(a) for a in answers]
    predicted = clean_whitespace(prediction)
    if len(set(humans)) > 1:  # only then: see point 2 of the module docstring
        humans = [process_digit_article(process_punctuation(a)) for a in humans]
        predicted = process_digit_article(process_punctuation(predicted))
    per_subset = []
    for left_out in range(len(humans)):
        matching = sum(1 for i, h in enumerate(humans) if i != left_out and h == predicted)
        per_subset.append(min(1, float(matching) / 3))
    return float(sum(per_subset)) / len(per_subset)


def official_round(value: float, decimals: int = OFFICIAL_DECIMALS) -> float:
    """round(value, decimals) as the official code's Python 2 does it: correctly rounded, ties away from zero.

    Python 3's round() sends exact ties to the even digit (round(58.125, 2) == 58.12; Python 2 gives 58.13).
    """
    return float(Decimal(value).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


def _percent(scores: list[float]) -> float:
    """100 * mean, in the official order of operations (100 * sum, then / count)."""
    return 100 * float(sum(scores)) / len(scores)


@dataclass
class VQAv2Scores:
    """Per-question VQAv2 accuracies with their question and answer types; the official aggregates."""

    per_question: list[float] = field(default_factory=list)
    by_question_type: dict[str, list[float]] = field(default_factory=dict)
    by_answer_type: dict[str, list[float]] = field(default_factory=dict)

    def add(self, accuracy: float, question_type: str, answer_type: str) -> None:
        self.per_question.append(accuracy)
        self.by_question_type.setdefault(question_type, []).append(accuracy)
        self.by_answer_type.setdefault(answer_type, []).append(accuracy)

    @property
    def num_questions(self) -> int:
        return len(self.per_question)

    @property
    def overall(self) -> float:
        """The mean accuracy over questions, in [0, 1], full precision."""
        return float(sum(self.per_question)) / len(self.per_question)

    def official(self) -> dict[str, Any]:
        """`VQAEval.accuracy` as setAccuracy fills it: percentages rounded to 2 decimals, its key names."""
        return {
            "overall": official_round(_percent(self.per_question)),
            "perQuestionType": {t: official_round(_percent(s)) for t, s in sorted(self.by_question_type.items())},
            "perAnswerType": {t: official_round(_percent(s)) for t, s in sorted(self.by_answer_type.items())},
        }

    def to_dict(self) -> dict[str, Any]:
        """Full-precision percentages and counts, plus `official` (the rounded figures the official code prints)."""

        def rows(groups: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
            return {t: {"num_questions": len(s), "accuracy_percent": _percent(s)} for t, s in sorted(groups.items())}

        return {
            "metric": "vqav2",
            "num_questions": self.num_questions,
            "overall_percent": _percent(self.per_question),
            "per_answer_type": rows(self.by_answer_type),
            "per_question_type": rows(self.by_question_type),
            "official": self.official(),
            "note": "*_percent: full precision; official: rounded to 2 decimals as vqaEval.py does (Python 2 round)",
        }
