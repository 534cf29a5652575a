"""Which stage-2 samples a shard record of any kind yields: shapes, LLaVA, captions, VQAv2, image folders.

A record is the JSON of one shard sample (plus its image's (h, w, d) LLM token ids, or None for a
text-only record). What it can teach is read off its fields, never off where it came from:

- `conversations` (LLaVA turns, `data from-llava`): vqa, the conversation as it is;
- `qa` [{question, answer}, ...] (`data shapes`, `data from-vqav2`): vqa, question/answer turns;
- `caption` / `captions` (shapes, `from-coco`, `from-folder` sidecars, img2dataset `.txt`): caption and
  text_to_image (whose prompt is `instruction` where a shapes record has one);
- an image (every image record): decompression.

The mixture (`stages/mllm/task_mixture.py`) draws tasks per record from a source's weights; a drawn task the
record cannot serve (a caption of a LLaVA record, decompression of a text-only one) is left out, since
the source's weights are expectations over records of every kind. A record that can serve none of the
tasks its source weights is a counted skip ("no task for record"), never a silent drop.

LLaVA conversations are rendered turn by turn in the model's template: the image is read where its
`<image>` placeholder stood in a human turn (LLaVA-1.5 data has it before or after the question), every
`gpt` turn is labelled, nothing else is (haotian-liu/LLaVA, `llava/train/train.py`, `preprocess_v1`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from unicode_mllm.constants import IMAGE_PLACEHOLDER
from unicode_mllm.data.conversation import ImageRead, Part, Turn
from unicode_mllm.data.converters import check_conversation, normalise_roles
from unicode_mllm.data.mllm_samples import MISSING_TEXT, TASKS, MLLMSample, MLLMSampleBuilder

NO_TASK = "no task for record"


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def record_captions(meta: Mapping[str, Any]) -> list[str]:
    """Every non-empty caption of a record: `captions` (COCO's five) or else `caption`."""
    many = meta.get("captions")
    if isinstance(many, list):
        texts = [_text(c) for c in many]
        if any(texts):
            return [t for t in texts if t]
    one = _text(meta.get("caption"))
    return [one] if one else []


def record_qa(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(question, answer) pairs of a `qa` list whose answer is known (VQAv2 test questions have none)."""
    pairs = []
    for item in meta.get("qa") or ():
        if isinstance(item, Mapping):
            question, answer = _text(item.get("question")), _text(item.get("answer"))
            if question and answer:
                pairs.append((question, answer))
    return pairs


def _split_at_image(value: str) -> tuple[Part, ...]:
    """A human turn's text -> its parts, the image read where `<image>` stood (surrounding blanks dropped)."""
    if IMAGE_PLACEHOLDER not in value:
        return (value.strip(),)
    before, after = value.split(IMAGE_PLACEHOLDER, 1)
    return tuple(p for p in (before.strip(), ImageRead(0), after.strip()) if not isinstance(p, str) or p)


def conversation_turns(conversations: Any, has_image: bool) -> list[Turn] | tuple[str, str]:
    """LLaVA turns -> template `Turn`s, or (skip reason, explanation) when the conversation cannot be used.

    Valid as `data from-llava` checks it (`converters.check_conversation`, one set of rules for both): turns
    alternating from human|user to gpt|assistant, ending with a reply, none empty; with an image, `<image>`
    exactly once, in a human turn; without one, not at all.
    """
    conversations = normalise_roles(conversations)
    problem = check_conversation(conversations, has_image)
    if problem is not None:
        return problem
    pairs = zip(conversations[::2], conversations[1::2], strict=True)
    return [Turn(_split_at_image(question["value"]), answer["value"].strip()) for question, answer in pairs]


def record_tasks(meta: Mapping[str, Any], has_image: bool) -> frozenset[str]:
    """The tasks a record can serve (see the module table)."""
    tasks = set()
    if "conversations" in meta or (has_image and record_qa(meta)):
        tasks.add("vqa")
    if has_image:
        tasks.add("decompression")
        if record_captions(meta):
            tasks.add("caption")
        if record_captions(meta) or _text(meta.get("instruction")):
            tasks.add("text_to_image")
    return frozenset(tasks)


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase.lower())}\b", text.lower()) is not None


def draw_vqa_turns(qa: Sequence[tuple[str, str]], turns: int, rng: random.Random) -> list[tuple[str, str]]:
    """Up to `turns` (question, answer) pairs in random order, none answerable from the turns before it.

    A pair is kept only if its answer is not named by an earlier kept question: after "What colour is
    the square? purple", "What shape is the purple object? square" would be answered by copying a word
    of the conversation, not by reading the image, and teacher forcing would reward that shortcut.
    """
    kept: list[tuple[str, str]] = []
    for question, answer in rng.sample(list(qa), len(qa)):
        if len(kept) == turns:
            break
        if not any(_mentions(earlier, answer) for earlier, _ in kept):
            kept.append((question, answer))
    return kept


def build_record_samples(
    builder: MLLMSampleBuilder,
    meta: Mapping[str, Any],
    image_token_ids: Tensor | None,
    tasks: Sequence[str] = TASKS,
    *,
    drop_prompt: Sequence[bool] = (),
    vqa_turns: int = 0,
    rng: random.Random | None = None,
    weighted_tasks: Sequence[str] | None = None,
) -> list[MLLMSample]:
    """The samples of one record (its shard JSON, its image's (h, w, d) ids or None) for the drawn `tasks`.

    A task may repeat. Drawn tasks the record cannot serve (`record_tasks`) are left out; when it can serve
    none of `weighted_tasks` (the tasks its source gives a weight; default: `tasks`) the record is a counted
    skip. drop_prompt: the CFG drop of each `text_to_image` entry in order (missing: the builder's own draw).
    vqa_turns: question/answer pairs per VQA conversation of a `qa` list (0: all, in order; else
    `draw_vqa_turns`); LLaVA conversations are kept whole. `rng` (default: seeded by the record id) draws
    those turns and which of several captions is used. Skips are counted in `builder.skips` (or raise).
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {list(TASKS)}")
    sample_id = str(meta.get("id", ""))
    rng = rng or random.Random(sample_id)
    has_image = image_token_ids is not None
    can = record_tasks(meta, has_image)
    wanted = set(tasks if weighted_tasks is None else weighted_tasks)
    if wanted and not can & wanted:
        fields = sorted(k for k in meta if k not in ("has_image",))[:6]
        builder._skip(
            NO_TASK,
            sample_id,
            f"a {'text-only ' if not has_image else ''}record with fields {fields} serves none of the tasks "
            f"{sorted(wanted)} (vqa needs conversations or qa, caption and text_to_image a caption, "
            "decompression an image); give its source other data.tasks weights",
        )
        return []
    drops = iter(drop_prompt)
    out: list[MLLMSample | None] = []
    for task in tasks:
        if task == "text_to_image":
            drop = next(drops, None)  # consumed even when left out, so later draws keep their place
        if task not in can:
            continue
        if task == "vqa":
            out.append(_vqa(builder, meta, image_token_ids, sample_id, vqa_turns, rng))
        elif task == "caption":
            out.append(builder.caption(image_token_ids, _pick(rng, record_captions(meta)), sample_id))
        elif task == "text_to_image":
            prompt = _text(meta.get("instruction")) or _pick(rng, record_captions(meta))
            out.append(builder.text_to_image(prompt, image_token_ids, sample_id, drop))
        else:
            out.append(builder.decompression(image_token_ids, sample_id))
    return [s for s in out if s is not None]


def _pick(rng: random.Random, texts: list[str]) -> str:
    # A draw only where there is a choice, so single-caption records leave the rng's later draws unchanged.
    return texts[0] if len(texts) == 1 else rng.choice(texts)


def _vqa(
    builder: MLLMSampleBuilder,
    meta: Mapping[str, Any],
    image_token_ids: Tensor | None,
    sample_id: str,
    vqa_turns: int,
    rng: random.Random,
) -> MLLMSample | None:
    if "conversations" in meta:
        turns = conversation_turns(meta["conversations"], image_token_ids is not None)
        if isinstance(turns, tuple):
            reason, message = turns
            return builder._skip(reason, sample_id, message)
        images = [image_token_ids] if image_token_ids is not None else []
        return builder.conversation(turns, images, "vqa", sample_id)
    qa = record_qa(meta)
    if not qa:
        return builder._skip(MISSING_TEXT, sample_id, "no question/answer pairs")
    if vqa_turns:
        qa = draw_vqa_turns(qa, vqa_turns, rng)
    return builder.vqa(image_token_ids, qa, sample_id)
