"""Teacher-forced stage-2 evaluation: per-task loss, VQA exact match, next-code accuracy.

One forward pass per batch, no decoding. For a single-turn VQA sample whose labels are the answer and
its end-of-turn token, "every answer position's argmax equals its label, and the argmax after the
answer is a reply end" is exactly "greedy decoding reproduces the answer token for token and stops":
greedy decoding feeds back its own argmax, which under this condition is the label itself. So the VQA
figure here is greedy exact match (at token level, a lower bound on string match), measured at the
cost of one forward pass.

For images written (text-to-image, decompression) it reports the next-code accuracy: the share of
code positions whose argmax is the target code given the true prefix.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from unicode_mllm.constants import IGNORE_INDEX
from unicode_mllm.data.mllm_samples import MODEL_INPUTS, MLLMCollator, MLLMSample, MLLMSampleBuilder
from unicode_mllm.data.record_samples import build_record_samples, record_captions, record_tasks
from unicode_mllm.data.shards import HAS_IMAGE_FIELD


@dataclass
class EvalSample:
    """A sample plus what it is scored by: its task, and for VQA the question kind."""

    sample: MLLMSample
    split: str
    kind: str = ""


def build_eval_samples(
    builder: MLLMSampleBuilder,
    records: Iterable[tuple[dict[str, Any], Tensor | None]],
    split: str,
    tasks: Sequence[str] = ("vqa", "text_to_image", "decompression"),
    max_questions_per_record: int = 0,
    seed: int = 0,
) -> list[EvalSample]:
    """From (record JSON, (h, w, d) token ids or None) pairs of any record kind (data/record_samples.py):
    single-turn VQA samples (one per question of a `qa` list; a LLaVA conversation whole), one text-to-image
    sample (instruction or first caption) and one decompression sample per image record; skips are counted
    by the builder."""
    out: list[EvalSample] = []
    rng = random.Random(f"eval-{seed}-{split}")
    for meta, ids in records:
        sample_id = str(meta.get("id", ""))
        if ids is None and meta.get(HAS_IMAGE_FIELD, True):
            continue  # an image record whose ids were unusable: counted by the caller's token-id reader
        can = record_tasks(meta, ids is not None)
        if "vqa" in tasks and "vqa" in can:
            if "conversations" in meta:
                sample = build_record_samples(builder, meta, ids, ("vqa",))
                out += [EvalSample(s, split) for s in sample]
            qa = [q for q in meta.get("qa") or () if isinstance(q, dict) and q.get("question") and q.get("answer")]
            if max_questions_per_record and len(qa) > max_questions_per_record:
                qa = rng.sample(qa, max_questions_per_record)
            for q in qa:
                sample = builder.vqa(ids, [(q["question"], q["answer"])], sample_id)
                if sample is not None:
                    out.append(EvalSample(sample, split, q.get("kind") or q.get("answer_type") or ""))
        if "text_to_image" in tasks and "text_to_image" in can:
            prompt = meta.get("instruction") or record_captions(meta)[0]
            sample = builder.text_to_image(prompt, ids, sample_id, drop_prompt=False)
            if sample is not None:
                out.append(EvalSample(sample, split))
        if "decompression" in tasks and "decompression" in can:
            sample = builder.decompression(ids, sample_id)
            if sample is not None:
                out.append(EvalSample(sample, split))
    return out


def token_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy per position: logits (b, t, V), labels (b, t) -> (b, t-1) losses, mask."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp_min(0), reduction="none")  # (b, t-1)
    return losses * mask, mask


@torch.no_grad()
def evaluate_teacher_forced(
    model: Any,
    samples: Sequence[EvalSample],
    collator: MLLMCollator,
    *,
    batch_size: int = 32,
    device: Any = "cpu",
    reply_end_ids: Collection[int] = (),
) -> dict[str, float]:
    """Metrics keyed `{split}/{name}`: `loss_{task}`, `vqa_exact` and `vqa_exact_{kind}` (fractions),
    `code_acc_{task}` for written images. `model` is a `UniCodeMLLM`.

    reply_end_ids: tokens that end a reply besides the labelled one (a template such as `plain` ends
    the last reply with eos and the others with a newline; decoding stops at either).
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)
    try:
        order = sorted(range(len(samples)), key=lambda i: len(samples[i].sample))  # similar lengths, less padding
        for start in range(0, len(order), batch_size):
            chunk = [samples[i] for i in order[start : start + batch_size]]
            batch = collator([s.sample for s in chunk])
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k != "labels"}
            labels = batch["labels"].to(device)
            logits = model(**inputs).logits  # (b, t, V)
            losses, mask = token_losses(logits, labels)
            targets = labels[:, 1:]
            correct = (logits[:, :-1].argmax(-1) == targets) & mask
            is_code = model.visual_tokenizer.is_code_token_id(targets.clamp_min(0)) & mask
            for row, item in enumerate(chunk):
                task = item.sample.task
                prefix = f"{item.split}/"
                sums[prefix + f"loss_{task}"] += float(losses[row].sum())
                counts[prefix + f"loss_{task}"] += float(mask[row].sum())
                if task == "vqa":
                    # The answer tokens, then a reply end: any of `reply_end_ids` ends greedy decoding.
                    where = mask[row].nonzero()[:, 0]
                    answer_ok = bool(correct[row][where[:-1]].all())
                    end_ok = int(logits[row, where[-1]].argmax()) in reply_end_ids or bool(correct[row][where[-1]])
                    exact = float(answer_ok and end_ok)
                    for name in ("vqa_exact", f"vqa_exact_{item.kind}" if item.kind else None):
                        if name:
                            sums[prefix + name] += exact
                            counts[prefix + name] += 1
                elif bool(is_code[row].any()):
                    sums[prefix + f"code_acc_{task}"] += float((correct[row] & is_code[row]).sum())
                    counts[prefix + f"code_acc_{task}"] += float(is_code[row].sum())
    finally:
        model.train(was_training)
    return {k: sums[k] / counts[k] for k in sorted(sums) if counts[k]}
