"""The writing path measured against its training target: teacher-forced codes, greedy codes, and whether the
cached decoder agrees with a full forward.

For an instruction and the (h, w, d) LLM token ids its image was trained to write:

- teacher forcing: after every prefix of the target sequence, the code the constrained decoder would pick
  (argmax among the visual-code ids); its agreement with the target is the model's memorisation of the image;
- greedy decoding (`generate_images`, temperature 0, no guidance): the codes it writes, how many equal the
  target, and the step at which it first leaves the target (after that, every code is conditioned on a prefix
  training never showed: exposure drift);
- the same argmax recomputed by one full forward over greedy's own prefixes: it must agree with greedy at
  every step. A disagreement is a train/inference mismatch on the writing path (prompt layout, positions,
  KV cache), not a property of the model.

`scripts/memorisation_check.py` runs this on images a model was trained on (RESULTS.md, the memorisation check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from unicode_mllm.generation.image_generation import generate_images
from unicode_mllm.generation.prompts import prompt_builder
from unicode_mllm.token_layout import grid_to_sequence

if TYPE_CHECKING:
    from unicode_mllm.model.mllm import UniCodeMLLM


@dataclass
class WritingPath:
    """target, forced, greedy: (h*w*d,) code token ids in writing order (the target's, teacher-forced argmax,
    greedy's); full_forward: the argmax of one full forward over greedy's prefixes (equal to greedy when the
    cached decoder matches training's forward)."""

    target: Tensor
    forced: Tensor
    greedy: Tensor
    full_forward: Tensor

    @property
    def teacher_forced_accuracy(self) -> float:
        return float((self.forced == self.target).float().mean())

    @property
    def greedy_accuracy(self) -> float:
        return float((self.greedy == self.target).float().mean())

    @property
    def first_departure(self) -> int:
        """The first step where greedy writes another code than the target (the span length when none)."""
        wrong = (self.greedy != self.target).nonzero()
        return int(wrong[0, 0]) if len(wrong) else len(self.target)

    @property
    def greedy_accuracy_after_departure(self) -> float | None:
        """Share of target codes greedy still writes after its first departure (None: it never departs)."""
        start = self.first_departure + 1
        if start >= len(self.target):
            return None
        return float((self.greedy[start:] == self.target[start:]).float().mean())

    @property
    def cached_vs_full_forward_agreement(self) -> float:
        return float((self.full_forward == self.greedy).float().mean())

    def summary(self) -> dict[str, float | int | None]:
        return {
            "teacher_forced_code_accuracy": self.teacher_forced_accuracy,
            "greedy_codes_equal_to_target": self.greedy_accuracy,
            "greedy_first_departure": self.first_departure,
            "greedy_codes_equal_after_departure": self.greedy_accuracy_after_departure,
            "cached_vs_full_forward_agreement": self.cached_vs_full_forward_agreement,
        }


@torch.no_grad()
def measure_writing_path(model: UniCodeMLLM, instruction: str, target: Tensor) -> WritingPath:
    """Teacher-forced and greedy decoding of one image; target: (h, w, d) LLM token ids of the model's codes."""
    was_training = model.training
    model.eval()
    try:
        prompt = prompt_builder(model).text_to_image_prompt(instruction)  # (t,) ending with <img>, as training
        vocab = torch.arange(model.lm.get_input_embeddings().num_embeddings)
        is_code = model.visual_tokenizer.is_code_token_id(vocab)  # (V,)
        device = next(model.lm.parameters()).device

        def constrained_argmax(sequence: Tensor) -> Tensor:
            """(span,) written ids -> (span,) the code chosen after each of their prefixes, by one full forward."""
            ids = torch.cat([prompt, sequence.cpu()])[None].to(device)  # (1, t + span)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().cpu()  # (t+span, V)
            logits = logits[len(prompt) - 1 : len(prompt) - 1 + len(sequence)]  # (span, V): each code's logits
            return logits.masked_fill(~is_code, float("-inf")).argmax(-1)

        target_sequence = grid_to_sequence(target.cpu())  # (span,) training's writing order
        greedy = generate_images(model, instruction, temperature=0.0, cfg_scale=1.0, decode=False).sequences[0, :-1]
        return WritingPath(
            target=target_sequence,
            forced=constrained_argmax(target_sequence),
            greedy=greedy,
            full_forward=constrained_argmax(greedy),
        )
    finally:
        model.train(was_training)
