"""Decoding on a `ReducedKVCache`: one token per step through the HF layers.

HF `generate` cannot drive a cache whose layers hold different token sets, nor continue RoPE positions from
the unreduced prompt length, so reduced prompts decode here. Each step feeds one embedding per row through
every layer with a per-layer mask (that layer's valid cached rows + the new token) and a per-layer position
(`ReducedKVCache.decode_positions`), appending its K/V. The token choice (greedy or sampled, constraints,
stop strings) is the answering loop's own (`generation/reduced_decoding.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from unicode_mllm.addons.token_reduction.kv_cache import ReducedKVCache
from unicode_mllm.addons.token_reduction.prefill import decoder_parts, run_cached_layer


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
