"""Decoding on a `ReducedKVCache`: one token per step through the HF layers, greedy generation on top.

HF `generate` cannot drive a cache whose layers hold different token sets, nor continue RoPE positions from
the unreduced prompt length, so reduced prompts decode here. Each step feeds one embedding per row through
every layer with a per-layer mask (that layer's valid cached rows + the new token) and a per-layer position
(`ReducedKVCache.decode_positions`), appending its K/V. Only greedy decoding is provided: sampling,
beams and classifier-free guidance stay with the model's own generation code (which runs unreduced).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from unicode_mllm.token_reduction.config import TokenReductionConfig
from unicode_mllm.token_reduction.guard import GenerationMode
from unicode_mllm.token_reduction.kv_cache import ReducedKVCache
from unicode_mllm.token_reduction.prefill import decoder_parts, reduced_prefill, run_cached_layer
from unicode_mllm.token_reduction.sequence import ReducedSequence


@torch.no_grad()
def decode_step(lm: Any, cache: ReducedKVCache, inputs_embeds: Tensor) -> Tensor:
    """Feed one token per row: (b, 1, c) embeddings -> (b, V) next-token logits; the cache grows by one row.

    Raises ValueError for a model in training mode or an input that is not (b, 1, c).
    """
    if getattr(lm, "training", False):
        raise ValueError("decode_step is inference-only; call lm.eval() first")
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[1] != 1:
        raise ValueError(f"decode_step feeds one token per row: (b, 1, c), got {tuple(inputs_embeds.shape)}")
    parts = decoder_parts(lm)
    b = inputs_embeds.shape[0]
    hidden = inputs_embeds
    new_valid = torch.ones(b, 1, dtype=torch.bool, device=hidden.device)
    new_source = torch.full((b, 1), cache.prompt_length + cache.num_decoded, device=hidden.device)
    for layer_idx in range(len(parts.layers)):
        positions = cache.decode_positions(layer_idx)[:, None]  # (b, 1)
        position_embeddings = parts.rotary_emb(hidden, positions)  # (cos, sin)
        allowed = torch.cat([cache.valid[layer_idx], new_valid], dim=1)[:, None, :]  # (b, 1, L_l + 1)
        hidden = run_cached_layer(
            parts, layer_idx, hidden, allowed, positions, position_embeddings, cache, new_valid, new_source
        )
    cache.num_decoded += 1
    return parts.lm_head(parts.norm(hidden))[:, -1]


@torch.no_grad()
def generate_reduced(
    lm: Any,
    sequence: ReducedSequence,
    config: TokenReductionConfig,
    *,
    generation_mode: GenerationMode,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> Tensor:
    """Greedy text generation from a (reduced) prompt: prefill with `config`, then decode on the reduced cache.

    Returns the new token ids (b, k), k <= max_new_tokens; after a row emits `eos_token_id` it is filled with
    `pad_token_id`, and the loop stops once every row has finished. Raises ValueError in image generation
    mode with reduction on (token reduction never runs while the LM writes an image).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prefill = reduced_prefill(lm, sequence, config, generation_mode=generation_mode)
    embed = decoder_parts(lm).embed_tokens
    next_ids = prefill.logits[:, -1].argmax(dim=-1)  # (b,)
    finished = torch.zeros_like(next_ids, dtype=torch.bool)
    out = []
    for step in range(max_new_tokens):
        next_ids = next_ids.masked_fill(finished, pad_token_id)
        out.append(next_ids)
        if eos_token_id is not None:
            finished = finished | (next_ids == eos_token_id)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = decode_step(lm, prefill.cache, embed(next_ids)[:, None])
        next_ids = logits.argmax(dim=-1)
    return torch.stack(out, dim=1)
