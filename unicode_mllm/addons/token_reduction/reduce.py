"""Vision-stage entry points: reduce image embeddings, build the reduced prompt the LLM stage prefills.

    reduced = reduce_image_tokens(image_embeds, (h, w), cfg, generation_mode="text")       # vision stage
    sequence = apply_image_reduction(input_ids, spliced, reduced, position_policy=cfg.position_policy)
    prefill = reduced_prefill(lm, sequence, cfg, generation_mode="text")                   # LLM stage

`build_reduced_sequence` does the first two steps; decoding continues on `prefill.cache`
(`generation/reduced_decoding.py`). Every entry point takes `generation_mode` and raises in `image` mode
unless the config is switched off (`guard.py`).
"""

from __future__ import annotations

from torch import Tensor

from unicode_mllm.addons.token_reduction.config import TokenReductionConfig
from unicode_mllm.addons.token_reduction.guard import GenerationMode, check_reduction_allowed
from unicode_mllm.addons.token_reduction.image_tokens import (
    VISION_REDUCERS,
    ReducedImageTokens,
    check_grid,
    identity_reduction,
)
from unicode_mllm.addons.token_reduction.sequence import ReducedSequence, apply_image_reduction, sequence_from_embeds
from unicode_mllm.constants import IMAGE_PLACEHOLDER_ID
from unicode_mllm.splice import SplicedInputs


def reduce_image_tokens(
    image_embeds: Tensor,
    grid_hw: tuple[int, int],
    config: TokenReductionConfig,
    *,
    generation_mode: GenerationMode,
    reading: str = "aggregated",
) -> ReducedImageTokens:
    """Vision-stage reduction `config.vision` of (n, h*w, c) raster image embeddings.

    `none` returns every token (identity). Raises ValueError in image generation mode with reduction on,
    for `interleaved` reading, or a shape that does not match the grid.
    """
    check_reduction_allowed(config, generation_mode=generation_mode, reading=reading)
    h, w = check_grid(image_embeds, grid_hw)
    if config.vision == "none" or image_embeds.shape[0] == 0:
        return identity_reduction(image_embeds, (h, w))
    section = getattr(config, config.vision)  # each method's settings sit in the section named like it
    reduced = VISION_REDUCERS.build(config.vision, {}, image_embeds=image_embeds, grid_hw=(h, w), config=section)
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
) -> ReducedSequence:
    """Splice output + its (n, h*w, c) image embeddings -> the left-packed, vision-reduced LM input.

    input_ids: (b, t) with placeholder spans; spliced: `splice_image_embeddings(input_ids, image_embeds, ...)`.
    With `config.vision == "none"` every slot is kept (positions unchanged), so the LLM stage can still prune.
    """
    if image_embeds is None:  # a text-only batch: the guard still runs, nothing is reduced
        check_reduction_allowed(config, generation_mode=generation_mode, reading=reading)
        is_image = input_ids == IMAGE_PLACEHOLDER_ID
        return sequence_from_embeds(spliced.inputs_embeds, spliced.attention_mask, is_image, spliced.position_ids)
    reduced = reduce_image_tokens(image_embeds, grid_hw, config, generation_mode=generation_mode, reading=reading)
    return apply_image_reduction(input_ids, spliced, reduced, position_policy=config.position_policy)
