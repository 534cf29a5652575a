"""Entry points the model calls: reduce image embeddings, build the reduced prompt, prefill, generate.

    reduced = reduce_image_tokens(image_embeds, (h, w), cfg, generation_mode="text")       # vision stage
    sequence = apply_image_reduction(input_ids, spliced, reduced, position_policy=cfg.position_policy)
    new_ids = generate_reduced(lm, sequence, cfg, generation_mode="text", max_new_tokens=32)  # LLM stage

`build_reduced_sequence` does the first two steps. Every entry point takes `generation_mode` and raises
in `image` mode unless the config is switched off (`guard.py`).
"""

from __future__ import annotations

from torch import Tensor

from unicode_mllm.constants import IMAGE_PLACEHOLDER_ID
from unicode_mllm.model.splice import SplicedInputs
from unicode_mllm.token_reduction.config import TokenReductionConfig
from unicode_mllm.token_reduction.ficoco import ficoco_vision_reduce
from unicode_mllm.token_reduction.focus_sampler import FocusVisionSampler
from unicode_mllm.token_reduction.guard import GenerationMode, check_reduction_allowed
from unicode_mllm.token_reduction.image_tokens import ReducedImageTokens, check_grid, identity_reduction
from unicode_mllm.token_reduction.mustdrop_merge import mustdrop_window_merge
from unicode_mllm.token_reduction.sequence import ReducedSequence, apply_image_reduction, sequence_from_embeds


def reduce_image_tokens(
    image_embeds: Tensor,
    grid_hw: tuple[int, int],
    config: TokenReductionConfig,
    *,
    generation_mode: GenerationMode,
    reading: str = "aggregated",
    sampler: FocusVisionSampler | None = None,
) -> ReducedImageTokens:
    """Vision-stage reduction `config.vision` of (n, h*w, c) raster image embeddings.

    `none` returns every token (identity). `focus_sampler` needs the trained `sampler` module (its own
    config must equal `config.focus_sampler`). Raises ValueError in image generation mode with reduction on,
    for `interleaved` reading, a shape that does not match the grid, or a missing or differently built sampler.
    """
    check_reduction_allowed(config, generation_mode=generation_mode, reading=reading)
    h, w = check_grid(image_embeds, grid_hw)
    if config.vision == "none" or image_embeds.shape[0] == 0:
        return identity_reduction(image_embeds, (h, w))
    if config.vision == "mustdrop_merge":
        reduced = mustdrop_window_merge(image_embeds, (h, w), config.mustdrop_merge)
    elif config.vision == "ficoco_v":
        reduced = ficoco_vision_reduce(image_embeds, (h, w), config.ficoco_v)
    elif config.vision == "focus_sampler":
        if sampler is None:
            raise ValueError("vision='focus_sampler' needs the trained FocusVisionSampler passed as sampler=")
        if sampler.config != config.focus_sampler:
            raise ValueError(
                f"the sampler was built with {sampler.config} but the reduction config says {config.focus_sampler}; "
                "build it as FocusVisionSampler(width, config.focus_sampler)"
            )
        reduced = sampler(image_embeds, (h, w))
    else:
        raise ValueError(f"vision reduction {config.vision!r} is unknown")
    reduced.check()
    return reduced


def build_reduced_sequence(
    input_ids: Tensor,
    spliced: SplicedInputs,
    image_embeds: Tensor | None,
    grid_hw: tuple[int, int],
    config: TokenReductionConfig,
    *,
    generation_mode: GenerationMode,
    reading: str = "aggregated",
    sampler: FocusVisionSampler | None = None,
) -> ReducedSequence:
    """Splice output + its (n, h*w, c) image embeddings -> the left-packed, vision-reduced LM input.

    input_ids: (b, t) with placeholder spans; spliced: `splice_image_embeddings(input_ids, image_embeds, ...)`.
    With `config.vision == "none"` every slot is kept (positions unchanged), so the LLM stage can still prune.
    """
    if image_embeds is None:  # a text-only batch: the guard still runs, nothing is reduced
        check_reduction_allowed(config, generation_mode=generation_mode, reading=reading)
        is_image = input_ids == IMAGE_PLACEHOLDER_ID
        return sequence_from_embeds(spliced.inputs_embeds, spliced.attention_mask, is_image, spliced.position_ids)
    reduced = reduce_image_tokens(
        image_embeds, grid_hw, config, generation_mode=generation_mode, reading=reading, sampler=sampler
    )
    return apply_image_reduction(input_ids, spliced, reduced, position_policy=config.position_policy)
