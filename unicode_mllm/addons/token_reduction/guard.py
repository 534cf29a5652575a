"""The generation guard: token reduction serves *reading* images only, never writing them.

A reduction drops or merges image embeddings the LM reads as context. A turn that generates an image must
see every code it conditions on and write all h*w*d codes; decompression samples read the full grid by
definition (h*w -> h*w*d). So every entry point of this package takes an explicit `generation_mode` and
calls `check_reduction_allowed`, which raises instead of silently switching the reduction off; a caller
that wants the switch-off behaviour asks `reduction_for_mode` for the config to use.
"""

from __future__ import annotations

from typing import Literal

from unicode_mllm.addons.token_reduction.config import TokenReductionConfig

GenerationMode = Literal["text", "image"]
GENERATION_MODES: tuple[str, ...] = ("text", "image")


def check_reduction_allowed(
    config: TokenReductionConfig, *, generation_mode: GenerationMode, reading: str = "aggregated"
) -> None:
    """Raise ValueError when `config` would reduce tokens in a turn that must not be reduced.

    generation_mode: `text` (the LM answers in text: reduction allowed) or `image` (the LM writes image codes:
        reduction forbidden). reading: the model's reading mode; reductions need `aggregated` (one embedding
        per grid cell), since `interleaved` spans are h*w*d long and carry no (h, w) grid per token.
    A switched-off config passes in every mode.
    """
    if generation_mode not in GENERATION_MODES:
        raise ValueError(f"generation_mode {generation_mode!r} is unknown; choose one of {list(GENERATION_MODES)}")
    if not config.enabled:
        return
    if generation_mode == "image":
        raise ValueError(
            f"token reduction (vision={config.vision!r}, llm={config.llm!r}) is for reading images only and must be "
            "off while generating an image; pass TokenReductionConfig() or use reduction_for_mode()"
        )
    if reading != "aggregated":
        raise ValueError(
            f"token reduction needs reading='aggregated' (one embedding per grid cell), got reading={reading!r}"
        )


def reduction_for_mode(config: TokenReductionConfig, generation_mode: GenerationMode) -> TokenReductionConfig:
    """The config to use for a turn: `config` for text answers, the switched-off config for image generation."""
    if generation_mode not in GENERATION_MODES:
        raise ValueError(f"generation_mode {generation_mode!r} is unknown; choose one of {list(GENERATION_MODES)}")
    return config if generation_mode == "text" else TokenReductionConfig()
