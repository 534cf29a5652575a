"""Text-to-image: prompt -> `<img>` + h*w*d sampled code token ids + `</img>` -> codes -> pixels.

The prompt is the builder's `text_to_image_prompt` (it ends with `<img>`, as in training). Decoding runs
with the KV cache over left-padded batches; inside the span only visual-code ids are allowed, exactly
h*w*d of them (`constrained_span.py`), and `</img>` closes it. With classifier-free guidance each batch
holds the conditional rows followed by one unconditional row (the empty prompt) per image, both fed the
same chosen token, and one forward serves both (`guidance.py`).

Every image owns a row seed (`sampling.row_seed(seed, index)`, index = prompt index * images per prompt
+ image index), so an image does not depend on the batch size or on the other prompts of the request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor

from unicode_mllm.data.image_io import tensor_to_pil
from unicode_mllm.data.mllm_samples import MLLMSample
from unicode_mllm.errors import UserError
from unicode_mllm.generation.batch_prefill import DEFAULT_BATCH_SIZE, check_batching, prefill_prompts
from unicode_mllm.generation.constrained_span import image_span_constraint
from unicode_mllm.generation.guidance import check_cfg_scale, mix_guidance
from unicode_mllm.generation.incremental_decoding import (
    evaluation_mode,
    model_device,
    supports_static_cache,
)
from unicode_mllm.generation.prompts import (
    check_fits,
    check_prompt_text,
    max_positions,
    prompt_builder,
    prompt_sample,
)
from unicode_mllm.generation.sampling import SamplingSettings, choose_next_tokens, row_seeds, uniform_draws
from unicode_mllm.token_layout import sequence_to_grid

if TYPE_CHECKING:
    from unicode_mllm.model.mllm import UniCodeMLLM

log = logging.getLogger(__name__)

_DECODE_CHUNK = 16  # images decoded to pixels per visual-tokenizer call


@dataclass
class ImageGeneration:
    """What a text-to-image request produced, one entry per image (n = prompts * images per prompt).

    token_ids: (n, h, w, d) int64 LLM token ids (all visual codes); sequences: (n, h*w*d + 1), the
    written span after `<img>`: codes in writing order, then `</img>`; seed: the request's seed and
    seeds: each image's row seed (both None when greedy); pixel_values: (n, 3, H, W) float in [-1, 1],
    None when not decoded.
    """

    prompts: list[str]
    token_ids: Tensor
    sequences: Tensor
    seed: int | None
    seeds: list[int] | None
    pixel_values: Tensor | None = None
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def images(self) -> list[Image.Image]:
        """The images as RGB PIL images (decoded on demand by `decode_token_ids` when generating)."""
        if self.pixel_values is None:
            raise ValueError("the images were not decoded; generate with decode=True or call decode_token_ids")
        return [tensor_to_pil(x) for x in self.pixel_values]


def decode_token_ids(model: UniCodeMLLM, token_ids: Tensor) -> Tensor:
    """(n, h, w, d) LLM token ids -> (n, 3, H, W) float32 images in [-1, 1] (on the CPU).

    Raises UserError when an id is not a visual code of the model's tokenizer.
    """
    vt = model.visual_tokenizer
    device = model_device(vt)
    codes = vt.token_ids_to_codes(token_ids.cpu())  # (n, h, w, d) codebook rows
    with evaluation_mode(vt):
        chunks = [
            vt.decode(codes[i : i + _DECODE_CHUNK].to(device)).float().cpu()
            for i in range(0, len(codes), _DECODE_CHUNK)
        ]
    return torch.cat(chunks) if chunks else torch.zeros(0, 3, vt.config.image_size, vt.config.image_size)


def unconditional_prompt(model: UniCodeMLLM) -> MLLMSample:
    """The empty prompt: classifier-free guidance's unconditional branch, as the training data drops to."""
    builder = prompt_builder(model)
    return prompt_sample(builder, builder.text_to_image_prompt(""))


def generate_image_sequences(
    model: UniCodeMLLM,
    prompts: Sequence[MLLMSample],
    *,
    sampling: SamplingSettings,
    cfg_scale: float = 1.0,
    use_cfg: bool | None = None,
    seed: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    use_cache: bool = True,
    cache_kind: str = "auto",
    compile_step: bool = False,
) -> tuple[Tensor, int | None, list[int] | None]:
    """Decode one image span per prompt.

    prompts: built prompts whose `input_ids` (t,) end with `<img>` (images they read in
        `image_token_ids`); repeat a prompt to get several images of it.
    use_cfg: run the unconditional rows; None means `cfg_scale != 1` (scale 1 needs no second branch,
        and gives the same tokens with it: `guidance.py`).
    batch_size: images (conditional rows) per forward; with guidance a forward holds twice as many rows.
    cache_kind: "auto" (a KV cache preallocated for prompt + span when the LM supports transformers'
        `StaticCache`, else the growing `DynamicCache`), "static" or "dynamic"; the tokens are the same.
    compile_step: every decode step through `torch.compile` (static cache only; the first call compiles, slowly;
        the same tokens; incremental_decoding.py).

    Returns (sequences (n, h*w*d + 1) int64 on the CPU: codes then `</img>`, the request seed, the row
    seeds), seeds None when greedy. Raises UserError for a prompt that does not end with `<img>` or does
    not fit the LM's positions, and for bad settings.
    """
    cfg_scale = check_cfg_scale(cfg_scale)
    use_cfg = cfg_scale != 1.0 if use_cfg is None else use_cfg
    per_depth = _check_settings(
        model, sampling, batch_size=batch_size, use_cache=use_cache, cache_kind=cache_kind, compile_step=compile_step
    )
    span = model.num_write_tokens  # h*w*d, asked of the tokenizer, never recomputed here
    if not prompts:
        return torch.zeros(0, span + 1, dtype=torch.long), None, None
    limit = max_positions(model.lm)
    for i, p in enumerate(prompts):
        if int(p.input_ids[-1]) != model.token_ids.image_start:
            raise UserError(f"prompt {i} does not end with <img>; build it with text_to_image_prompt")
        check_fits(len(p), span + 1, limit, f"image prompt {i}")
    uncond = unconditional_prompt(model) if use_cfg else None
    request_seed = sampling.request_seed(seed)
    seeds = row_seeds(request_seed, range(len(prompts)))
    decoding = {"use_cache": use_cache, "cache_kind": cache_kind, "compile_step": compile_step}
    out = []
    with evaluation_mode(model):
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            chunk_seeds = None if seeds is None else seeds[start : start + len(chunk)]
            out.append(_decode_spans(model, chunk, uncond, chunk_seeds, per_depth, cfg_scale, **decoding))
    return torch.cat(out), request_seed, seeds


def _check_settings(
    model: UniCodeMLLM,
    sampling: SamplingSettings,
    *,
    batch_size: int,
    use_cache: bool,
    cache_kind: str,
    compile_step: bool,
) -> list[SamplingSettings]:
    """UserError for settings `generate_image_sequences` cannot run; returns the sampling settings per code depth."""
    check_batching(batch_size, cache_kind)
    if compile_step and (cache_kind == "dynamic" or not use_cache or not supports_static_cache(model.lm)):
        raise UserError(
            "compile_step needs the static KV cache: use_cache=True, cache_kind 'auto' or 'static', and an LM "
            f"that supports it ({type(model.lm).__name__} does{'' if supports_static_cache(model.lm) else ' not'})"
        )
    depth = model.code_shape[2]  # codes are written depth-first per position: step s is at depth s % d
    if sampling.depth_temperatures is not None and len(sampling.depth_temperatures) != depth:
        raise UserError(
            f"depth temperatures {list(sampling.depth_temperatures)} give {len(sampling.depth_temperatures)} "
            f"values; this model writes {depth} codes per position: give {depth}"
        )
    return [sampling.at_depth(k) for k in range(depth)]


def _decode_spans(
    model: UniCodeMLLM,
    chunk: list[MLLMSample],
    uncond: MLLMSample | None,
    seeds: list[int] | None,
    per_depth: list[SamplingSettings],
    cfg_scale: float,
    **decoding: Any,
) -> Tensor:
    """One batch: b prompts (plus b unconditional rows with guidance) -> (b, h*w*d + 1) codes and `</img>`, CPU."""
    b, span, depth = len(chunk), model.num_write_tokens, len(per_depth)
    device = model_device(model.lm)
    rows = chunk + [uncond] * b if uncond is not None else chunk  # cond rows first, then theirs
    # No token reduction here, whatever model.token_reduction says: a turn that writes an image reads
    # every token of its context (addons/token_reduction/guard.py).
    # span - 1 steps follow the prefill (the last code needs none): the static cache holds prompt + span - 1.
    decoder, logits = prefill_prompts(model, rows, max_new_tokens=span - 1, **decoding)  # logits (rows, V)
    constraint = image_span_constraint(model, logits.shape[-1], allow_image_start=False)
    state = constraint.initial_state(b, inside=True, device=device)
    uniforms = None if seeds is None else uniform_draws(seeds, span)  # (b, n), CPU
    chosen = torch.empty(b, span, dtype=torch.long, device=device)
    for step in range(span):
        step_logits = mix_guidance(logits, cfg_scale) if uncond is not None else logits  # (b, V)
        step_logits = constraint.apply(step_logits, state)
        draws = None if uniforms is None else uniforms[:, step]
        next_ids = choose_next_tokens(step_logits, per_depth[step % depth], draws)
        state = constraint.advance(state, next_ids)
        chosen[:, step] = next_ids
        if step + 1 < span:  # the last code needs no forward: `</img>` is forced after it
            logits = decoder.step(next_ids.repeat(2) if uncond is not None else next_ids)
    assert bool(constraint.is_complete(state).all()), f"span states {state.tolist()} after {span} codes"
    close = torch.full((b, 1), model.token_ids.image_end, dtype=torch.long, device=device)
    return torch.cat([chosen, close], dim=1).cpu()


def generate_images(
    model: UniCodeMLLM,
    prompts: str | Sequence[str],
    *,
    num_images_per_prompt: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    seed: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    use_cfg: bool | None = None,
    use_cache: bool = True,
    cache_kind: str = "auto",
    compile_step: bool = False,
    decode: bool = True,
    depth_temperatures: Sequence[float] | None = None,
) -> ImageGeneration:
    """Text prompts -> `num_images_per_prompt` images each, in prompt order.

    Sampling: temperature 1.0 samples the model's own distribution over codes; temperature 0 (greedy)
    is allowed but tends to give flat images. depth_temperatures: one temperature per code depth of a
    position (d values), replacing `temperature`. decode: also decode the ids to pixels. cache_kind: the KV
    cache ("auto", "static", "dynamic"), compile_step: compiled decode steps (`generate_image_sequences`).
    Raises UserError for an empty prompt, a prompt too long for the LM, or bad settings.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if num_images_per_prompt < 1:
        raise UserError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    if not prompts:
        raise UserError("no prompts given; pass at least one text prompt")
    texts = [check_prompt_text(p, "image prompt") for p in prompts]
    sampling = SamplingSettings(temperature, top_k, top_p, depth_temperatures)  # normalised to a tuple there
    if sampling.is_greedy:
        log.warning("greedy image decoding (temperature 0) tends to give flat images; sample with temperature 1")
    builder = prompt_builder(model)
    built = [prompt_sample(builder, builder.text_to_image_prompt(t)) for t in texts]
    rows = [p for p in built for _ in range(num_images_per_prompt)]
    row_prompts = [t for t in texts for _ in range(num_images_per_prompt)]
    sequences, request_seed, seeds = generate_image_sequences(
        model,
        rows,
        sampling=sampling,
        cfg_scale=cfg_scale,
        use_cfg=use_cfg,
        seed=seed,
        batch_size=batch_size,
        use_cache=use_cache,
        cache_kind=cache_kind,
        compile_step=compile_step,
    )
    token_ids = sequence_to_grid(sequences[:, :-1], model.code_shape)  # (n, h, w, d)
    return ImageGeneration(
        prompts=row_prompts,
        token_ids=token_ids,
        sequences=sequences,
        seed=request_seed,
        seeds=seeds,
        pixel_values=decode_token_ids(model, token_ids) if decode else None,
        settings={
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "cfg_scale": cfg_scale,
            "num_images_per_prompt": num_images_per_prompt,
            "seed": request_seed,
            "depth_temperatures": sampling.depth_temperatures,
        },
    )
