"""Prefill with in-LM image-token pruning: the HF decoder layers run one by one, tokens leave between them.

`reduced_prefill` runs the LM's own decoder layers (HF modules, called, never copied) on a
`ReducedSequence`. After every pruning layer K the pruner (`pruner.py`) sees that layer's head-averaged
attention probabilities and decides which image tokens continue into layers K+1..; the sequence is then
re-packed (left padding, per-row counts may differ: batches need no equal keep counts). The output is the
logits of the tokens that left the last layer plus a `ReducedKVCache` for decoding (`decode.py`).

Attention probabilities at a pruning layer come from an explicit-softmax path (`attention_probs`): the
layer's input norm, q/k projections and RoPE, with the same mask, so they are the probabilities the layer
used; only pruning layers pay for it (the layer itself may run SDPA). Layer K itself runs on all tokens.

Policies (explicit, see `config.py`):
- position ids, `keep_original`: survivors keep their RoPE positions through every layer; `renumber`:
  after each pruning layer survivors are renumbered 0..n-1 (the MustDrop reference's `narrow`);
- KV cache, `layerwise` or `final_set` (MustDrop stage 3), see `kv_cache.py`.

Masks: causal in sequence order (re-packing keeps order) and padding-aware, built per call in the form the
attention implementation expects (bool for `sdpa`, additive float for `eager`); other implementations
(flash, flex) are refused. A padding query row may attend to itself only, so no row is empty (no NaN).

Supported LMs: decoder-only HF models laid out like LLaMA (`model.layers[i]` with `self_attn.{q,k}_proj`,
`input_layernorm`, `model.rotary_emb`, `model.norm`, `lm_head`): LLaMA, Mistral, Qwen2; a peft wrapper is
looked through. Inference only: it runs under `torch.no_grad()` and refuses a model in training mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from unicode_mllm.addons.token_reduction.config import TokenReductionConfig
from unicode_mllm.addons.token_reduction.guard import GenerationMode, check_reduction_allowed
from unicode_mllm.addons.token_reduction.image_tokens import compact_rows, gather_rows
from unicode_mllm.addons.token_reduction.kv_cache import ReducedKVCache, apply_kv_policy
from unicode_mllm.addons.token_reduction.pruner import LLMTokenPruner, PruneInputs, build_pruner
from unicode_mllm.addons.token_reduction.sequence import ReducedSequence, check_position_policy
from unicode_mllm.kv_cache_args import cache_argument

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class DecoderParts:
    """The pieces of a HF causal LM the layer loop calls."""

    layers: nn.ModuleList
    rotary_emb: nn.Module
    norm: nn.Module
    lm_head: nn.Module
    embed_tokens: nn.Module
    attn_implementation: str
    cache_argument: str  # the decoder layers' KV-cache keyword, see `kv_cache_args.py`


def decoder_parts(lm: Any) -> DecoderParts:
    """Find layers, rotary embedding, final norm, head and attention implementation of a LLaMA-like causal LM.

    Raises ValueError for a layout this loop does not know or an unsupported attention implementation.
    """
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft wraps the HF model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    missing = [name for name in ("layers", "rotary_emb", "norm") if not hasattr(decoder, name)]
    if decoder is None or missing:
        raise ValueError(
            f"{type(base).__name__} is not laid out like LLaMA (decoder lacks {missing}); token reduction in the LM "
            "supports LLaMA-style decoders (LLaMA, Mistral, Qwen2)"
        )
    attn = decoder.layers[0].self_attn
    if hasattr(attn, "q_norm") or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "head_dim", "scaling")):
        raise ValueError(f"{type(attn).__name__} is not a LLaMA-style attention (q/k norms or other projections)")
    impl = base.config._attn_implementation
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {impl!r} is not supported by the pruning loop; load the LM with "
            f"attn_implementation in {list(SUPPORTED_ATTENTION)}"
        )
    return DecoderParts(
        layers=decoder.layers,
        rotary_emb=decoder.rotary_emb,
        norm=decoder.norm,
        lm_head=base.get_output_embeddings(),
        embed_tokens=base.get_input_embeddings(),
        attn_implementation=impl,
        cache_argument=cache_argument(decoder.layers[0]),
    )


def attention_mask_for(allowed: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """(b, Lq, Lk) bool "may attend" -> (b, 1, Lq, Lk) mask in the form `implementation` reads."""
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def prefill_allowed(valid: Tensor) -> Tensor:
    """(b, L) validity -> (b, L, L) bool: causal in sequence order, padding keys hidden, every row sees itself."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return (causal[None] & valid[:, None, :]) | eye[None]


def run_cached_layer(
    parts: DecoderParts,
    layer_idx: int,
    hidden: Tensor,
    allowed: Tensor,
    positions: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    cache: ReducedKVCache,
    valid: Tensor,
    source: Tensor,
) -> Tensor:
    """Run decoder layer `layer_idx` on hidden (b, L, c) and record its new K/V rows in `cache`; -> (b, L, c).

    allowed: (b, L, L_k) bool "may attend" over the cached rows plus these; positions: (b, L) RoPE positions
    and position_embeddings their (cos, sin); valid, source: (b, L) the rows' validity and source column,
    recorded with the K/V the layer appends (`ReducedKVCache.add_rows`).
    """
    hidden = parts.layers[layer_idx](
        hidden,
        attention_mask=attention_mask_for(allowed, parts.attn_implementation, hidden.dtype),
        position_ids=positions,
        use_cache=True,
        position_embeddings=position_embeddings,
        **{parts.cache_argument: cache},
    )
    cache.add_rows(layer_idx, valid, source)
    return hidden


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def attention_probs(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor) -> Tensor:
    """The head-averaged softmax attention layer `layer` computes on `hidden`: (b, L, c) -> (b, L, L) fp32.

    cos, sin: (b, L, head_dim) from the LM's rotary embedding; allowed: (b, L, L) bool.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, length, _ = x.shape
    q = attn.q_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2).float()  # (b, H, L, d)
    k = attn.k_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2).float()  # (b, H_kv, L, d)
    cos, sin = cos[:, None].float(), sin[:, None].float()
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query heads share keys
    logits = (q @ k.transpose(-1, -2)) * attn.scaling
    logits = logits.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    return logits.softmax(dim=-1).mean(dim=1)


@dataclass
class PrefillOutput:
    """Result of `reduced_prefill` (t_f = tokens leaving the last layer, left-padded).

    logits: (b, t_f, V); attention_mask: (b, t_f) long; position_ids: (b, t_f) long, the positions the last
    layer used; source_index: (b, t_f) long, column of the prefill input `sequence` (-1 on padding; compose
    with `sequence.source_index` for the unreduced prompt's column); is_image: (b, t_f);
    token_sizes: (b, t_f); cache: for `decode.py`; image_tokens_per_layer: (num_layers, b) long, image
    tokens each layer processed.
    """

    logits: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    source_index: Tensor
    is_image: Tensor
    token_sizes: Tensor
    cache: ReducedKVCache
    image_tokens_per_layer: Tensor


@torch.no_grad()
def reduced_prefill(
    lm: Any,
    sequence: ReducedSequence,
    config: TokenReductionConfig,
    *,
    generation_mode: GenerationMode,
    pruner: LLMTokenPruner | None = None,
) -> PrefillOutput:
    """Run the LM over `sequence`, dropping image tokens after the pruning layers of `config` (or `pruner`).

    `pruner` overrides the one `config.llm` names (for custom pruners); its `layers` then apply. With
    `config.llm == "none"` and no pruner this is a plain prefill that also fills a `ReducedKVCache`.
    Raises ValueError in image generation mode with reduction on (`guard.py`), for a model in training mode,
    an unsupported LM layout, a pruning layer the LM lacks, or a pruner that drops a non-image token.
    """
    check_reduction_allowed(config, generation_mode=generation_mode)
    if pruner is not None and generation_mode != "text":
        raise ValueError("a pruner was passed in image generation mode; token reduction must be off there")
    check_position_policy(config.position_policy)
    if getattr(lm, "training", False):
        raise ValueError("reduced_prefill is inference-only; call lm.eval() first")
    parts = decoder_parts(lm)
    num_layers = len(parts.layers)
    config.validate(num_layers=num_layers)
    pruner = pruner if pruner is not None else build_pruner(config)
    pruning_layers = tuple(sorted(set(pruner.layers))) if pruner is not None else ()
    if pruning_layers and (pruning_layers[0] < 0 or pruning_layers[-1] >= num_layers):
        raise ValueError(f"pruning layers {pruning_layers} outside the LM's {num_layers} layers")

    # Re-pack to the left once, so the last column is every row's last real token.
    index, valid = compact_rows(sequence.attention_mask.bool())
    hidden = gather_rows(sequence.inputs_embeds, index)  # (b, L, c)
    positions = gather_rows(sequence.position_ids, index, fill=1)
    is_image = gather_rows(sequence.is_image, index, fill=False)
    sizes = gather_rows(sequence.token_sizes.float(), index)
    source = index  # (b, L) column of the prefill input, -1 on padding
    seen_image = is_image.long().cumsum(dim=-1) > 0
    is_text_query = valid & ~is_image & seen_image

    cache = ReducedKVCache(num_layers, config.position_policy, sequence.next_position.clone())
    cache.prompt_length = sequence.inputs_embeds.shape[1]
    image_counts = []
    for layer_idx, layer in enumerate(parts.layers):
        image_counts.append(is_image.sum(dim=-1))
        cos, sin = parts.rotary_emb(hidden, positions)
        allowed = prefill_allowed(valid)
        probs = attention_probs(layer, hidden, cos, sin, allowed) if layer_idx in pruning_layers else None
        hidden = run_cached_layer(parts, layer_idx, hidden, allowed, positions, (cos, sin), cache, valid, source)
        if probs is None:
            continue
        decision = pruner.select(PruneInputs(probs, hidden, is_image, is_text_query, valid, sizes, layer_idx))
        dropped = valid & ~decision.keep
        if bool((dropped & ~is_image).any()):
            raise ValueError(f"the pruner at layer {layer_idx} dropped a text or padding token; only image tokens go")
        index, valid = compact_rows(decision.keep & valid)
        hidden = gather_rows(decision.hidden, index)
        is_image = gather_rows(is_image, index, fill=False)
        is_text_query = gather_rows(is_text_query, index, fill=False)
        sizes = gather_rows(decision.sizes, index)
        source = gather_rows(source, index, fill=-1)
        if config.position_policy == "keep_original":
            positions = gather_rows(positions, index, fill=1)
        else:
            positions = (valid.long().cumsum(dim=-1) - 1).masked_fill(~valid, 1)

    logits = parts.lm_head(parts.norm(hidden))
    apply_kv_policy(cache, config.kv_policy, pruning_layers, source, valid)
    return PrefillOutput(
        logits=logits,
        attention_mask=valid.long(),
        position_ids=positions,
        source_index=source,
        is_image=is_image,
        token_sizes=sizes,
        cache=cache,
        image_tokens_per_layer=torch.stack(image_counts),
    )
