"""One-token-at-a-time LM forward over a left-padded batch, with Hugging Face's KV cache or without it.

The prompt goes in once as `inputs_embeds` (images already spliced in); every later step feeds the ids
just chosen. Positions count real tokens only (`position_ids_from_attention_mask`), so a left-padded row
sees the positions it would see alone, and the attention mask grows by one column per step. Without the
cache (`use_cache=False`) every step re-runs the whole sequence: slow, and there to check the cache.

Cache kinds (`cache_kind`): when the caller knows how many tokens at most will follow the prompt
(`prefill(..., max_new_tokens=n)`: an image span's h*w*d is known before decoding starts), "static" preallocates
transformers' own `StaticCache` for prompt + n slots, so a step writes its keys and values in place instead of
concatenating onto every layer's cache (`DynamicCache`: ~16% of a batch-8 image decode); the attention mask is
preallocated too, one column switched on per step. "auto" (the default) takes the static cache when the LM
supports it (`supports_static_cache`) and the caller gave `max_new_tokens`, else the dynamic one; "dynamic"
always grows. Both give the same tokens: the static cache's unused slots are masked out (tests/test_static_cache.py).

Compiled steps (`compile_step=True`, static cache only): every `step` runs `torch.compile(lm, dynamic=False)`,
compiled once per LM and kept for its lifetime; the static cache is then sized up to a multiple of
`COMPILE_BUCKET` slots, so that prompts of different lengths reuse a few graphs instead of recompiling each time
(the extra slots are masked like the other unused ones: the same tokens). The prefill stays eager. Measured on the
CPU: 1.05-1.16x the eager static steps at configs/lm/small.yaml's shape, batch 8, after ~40 s of compiling
(BENCHMARKS.md); the case for it is the GPU, where a fixed-shape step removes the per-kernel launch overhead.

Linear kernels (`linear_kernels`, CPU): "auto" (the default) runs the LM's large fp32 linear layers through oneDNN's
inner product on packed copies of their weights while decoding (`onednn_linears.py`: 1.19-1.23x HF `generate` at
configs/lm/small.yaml's shape, batch 8, the same tokens; BENCHMARKS.md), "onednn" every fp32 linear layer, "default"
leaves them to PyTorch's sgemm. Compiled steps keep the default kernels.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from unicode_mllm.generation.onednn_linears import LINEAR_KERNELS, OneDNNLinears, onednn_linears
from unicode_mllm.kv_cache_args import LEGACY_STATE_CACHE, cache_argument, output_cache
from unicode_mllm.splice import position_ids_from_attention_mask


@contextmanager
def evaluation_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration; the training flag is restored after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def model_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _accepts_logits_to_keep(lm: Any) -> bool:
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft forwards kwargs to its base
    return "logits_to_keep" in inspect.signature(base.forward).parameters


CACHE_KINDS = ("auto", "static", "dynamic")
COMPILE_BUCKET = 64  # static cache lengths of compiled steps round up to this: a few graphs for all prompt lengths
COMPILE_BACKEND = "inductor"  # torch.compile's default; tests swap in "aot_eager" (the same graph, no codegen)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # lm -> {backend: torch.compile(lm)}


def compiled_lm(lm: Any) -> Any:
    """`torch.compile(lm, dynamic=False)`, built once per LM (compiling is slow; its graphs are reused)."""
    per_backend = _COMPILED.setdefault(lm, {})
    if COMPILE_BACKEND not in per_backend:
        per_backend[COMPILE_BACKEND] = torch.compile(lm, dynamic=False, backend=COMPILE_BACKEND)
    return per_backend[COMPILE_BACKEND]


def _base_model(lm: Any) -> Any:
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def supports_static_cache(lm: Any) -> bool:
    """Whether `lm` can run on a preallocated `StaticCache`, from what transformers declares about it.

    Needs: a decoder-only model that takes a KV cache (not a state-space `cache_params`), whose class
    declares `_can_compile_fullgraph` (transformers' flag for static-cache / compiled decoding, false for MoE,
    Mamba and the like) and `_supports_default_dynamic_cache` (false for models with their own cache format),
    and whose config's layer types all have a static layer (`StaticCache` can be built for it).
    """
    from transformers import StaticCache

    base = _base_model(lm)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if cache_argument(base) == LEGACY_STATE_CACHE:
        return False
    if not getattr(base, "_can_compile_fullgraph", False):
        return False
    supports_dynamic = getattr(type(base), "_supports_default_dynamic_cache", None)
    if supports_dynamic is None or not supports_dynamic():
        return False
    try:
        StaticCache(config=config, max_cache_len=1)
    except (KeyError, ValueError, TypeError, AttributeError, NotImplementedError):
        return False
    return True


class IncrementalDecoder:
    """Holds the growing attention mask, positions and KV cache of one batch of rows.

    lm: a HF causal LM (optionally peft-wrapped). Call `prefill` once, then `step` per new token;
    both return fp32 logits (b, V) for the next token of every row. cache_kind: "auto", "static" or
    "dynamic" (module docstring); "static" on an LM without static-cache support raises ValueError.
    """

    def __init__(
        self,
        lm: Any,
        *,
        use_cache: bool = True,
        cache_kind: str = "auto",
        compile_step: bool = False,
        linear_kernels: str = "auto",
    ):
        if cache_kind not in CACHE_KINDS:
            raise ValueError(f"cache_kind must be one of {CACHE_KINDS}; got {cache_kind!r}")
        if linear_kernels not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernels must be one of {LINEAR_KERNELS}; got {linear_kernels!r}")
        if compile_step and (cache_kind == "dynamic" or not use_cache):
            raise ValueError("compile_step needs the static KV cache (cache_kind 'auto' or 'static', use_cache=True)")
        self.lm = lm
        self.linear_kernels = linear_kernels
        self._linears = OneDNNLinears(lm, "default")  # packed at prefill (`onednn_linears`), when autograd is off
        self.compile_step = compile_step
        self.use_cache = use_cache
        self.cache_kind = cache_kind
        self._static_supported = use_cache and cache_kind != "dynamic" and supports_static_cache(lm)
        if cache_kind == "static" and use_cache and not self._static_supported:
            raise ValueError(f"{type(_base_model(lm)).__name__} does not support a static KV cache; use 'auto'")
        self.static = False  # whether the current batch runs on a preallocated StaticCache
        self._length = 0  # filled columns of the preallocated attention mask (static only)
        self._logits_to_keep = _accepts_logits_to_keep(lm)
        self._cache_argument = cache_argument(lm)  # "cache" (5.25) or "past_key_values" (5.0-5.18)
        self.attention_mask: Tensor | None = None  # (b, t + k) long
        self.cache: Any = None
        self.inputs_embeds: Tensor | None = None  # (b, t + k, c), kept only without the cache

    def _forward(self, lm: Any = None, **inputs: Any) -> Tensor:
        if self._logits_to_keep:
            inputs["logits_to_keep"] = 1  # only the last position's logits: (b, 1, V) instead of (b, t, V)
        inputs[self._cache_argument] = self.cache
        if lm is None:
            with self._linears.active():
                out = self.lm(use_cache=self.use_cache, **inputs)
        else:  # the compiled LM: its graph holds the default kernels
            out = lm(use_cache=self.use_cache, **inputs)
        if self.use_cache:
            self.cache = output_cache(out)
        return out.logits[:, -1].float()  # (b, V): sampling and guidance in fp32 for a bf16 LM

    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor, *, max_new_tokens: int | None = None) -> Tensor:
        """inputs_embeds (b, t, c), attention_mask (b, t) (left padding, 1 = real) -> (b, V) logits.

        max_new_tokens: the most `step` calls that will follow; with it (and a static-capable LM, cache kind
        not "dynamic") the KV cache and the attention mask are preallocated for t + max_new_tokens slots.
        """
        if inputs_embeds.shape[:2] != attention_mask.shape:
            raise ValueError(
                f"inputs_embeds {tuple(inputs_embeds.shape)} and attention_mask {tuple(attention_mask.shape)} differ"
            )
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("the prompt batch must be left-padded: every row's last slot must be a real token")
        if max_new_tokens is not None and max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
        self.cache = None
        self._linears = onednn_linears(self.lm, "default" if self.compile_step else self.linear_kernels)
        self.attention_mask = attention_mask.long()
        self.inputs_embeds = None if self.use_cache else inputs_embeds
        positions = position_ids_from_attention_mask(self.attention_mask)
        self.static = self._static_supported and max_new_tokens is not None
        if self.compile_step and not self.static:
            raise ValueError("compile_step needs max_new_tokens and an LM that supports the static cache")
        if self.static:
            from transformers import StaticCache

            b, t = attention_mask.shape
            slots = t + max_new_tokens
            if self.compile_step:
                slots = -(-slots // COMPILE_BUCKET) * COMPILE_BUCKET  # a few graphs for all prompt lengths
            self.cache = StaticCache(config=_base_model(self.lm).config, max_cache_len=slots)
            full = attention_mask.new_zeros((b, slots), dtype=torch.long)  # (b, slots >= t + n), 0 = not yet
            full[:, :t] = self.attention_mask
            self.attention_mask, self._length = full, t
        return self._forward(inputs_embeds=inputs_embeds, attention_mask=self.attention_mask, position_ids=positions)

    def step(self, token_ids: Tensor) -> Tensor:
        """(b,) ids chosen last -> (b, V) logits of the token after them."""
        if self.attention_mask is None:
            raise RuntimeError("call prefill before step")
        mask = self.attention_mask
        position = mask.sum(dim=-1, keepdim=True)  # (b, 1): n real tokens hold positions 0..n-1; the new one is n
        ids = token_ids.to(mask.device).long()[:, None]  # (b, 1)
        if self.static:
            if self._length >= mask.shape[1]:
                raise RuntimeError(
                    f"the static cache holds {mask.shape[1]} tokens; prefill with a larger max_new_tokens"
                )
            mask[:, self._length] = 1  # in place: the preallocated (b, t + n) mask, one more column on
            self._length += 1
            lm = compiled_lm(self.lm) if self.compile_step else None
            return self._forward(lm, input_ids=ids, attention_mask=mask, position_ids=position)
        self.attention_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)  # (b, t + k + 1)
        if self.use_cache:
            return self._forward(input_ids=ids, attention_mask=self.attention_mask, position_ids=position)
        new = self.lm.get_input_embeddings()(ids)  # (b, 1, c)
        self.inputs_embeds = torch.cat([self.inputs_embeds, new.to(self.inputs_embeds.dtype)], dim=1)
        return self._forward(
            inputs_embeds=self.inputs_embeds,
            attention_mask=self.attention_mask,
            position_ids=position_ids_from_attention_mask(self.attention_mask),
        )
