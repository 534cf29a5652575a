"""One-token-at-a-time LM forward over a left-padded batch, with Hugging Face's KV cache or without it.

The prompt goes in once as `inputs_embeds` (images already spliced in); every later step feeds the ids
just chosen. Positions count real tokens only (`position_ids_from_attention_mask`), so a left-padded row
sees the positions it would see alone, and the attention mask grows by one column per step. Without the
cache (`use_cache=False`) every step re-runs the whole sequence: slow, and there to check the cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from unicode_mllm.kv_cache_args import cache_argument, output_cache
from unicode_mllm.model.splice import position_ids_from_attention_mask


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


class IncrementalDecoder:
    """Holds the growing attention mask, positions and KV cache of one batch of rows.

    lm: a HF causal LM (optionally peft-wrapped). Call `prefill` once, then `step` per new token;
    both return fp32 logits (b, V) for the next token of every row.
    """

    def __init__(self, lm: Any, *, use_cache: bool = True):
        self.lm = lm
        self.use_cache = use_cache
        self._logits_to_keep = _accepts_logits_to_keep(lm)
        self._cache_argument = cache_argument(lm)  # "cache" (5.25) or "past_key_values" (5.0-5.18)
        self.attention_mask: Tensor | None = None  # (b, t + k) long
        self.cache: Any = None
        self.inputs_embeds: Tensor | None = None  # (b, t + k, c), kept only without the cache

    def _forward(self, **inputs: Any) -> Tensor:
        if self._logits_to_keep:
            inputs["logits_to_keep"] = 1  # only the last position's logits: (b, 1, V) instead of (b, t, V)
        inputs[self._cache_argument] = self.cache
        out = self.lm(use_cache=self.use_cache, **inputs)
        if self.use_cache:
            self.cache = output_cache(out)
        return out.logits[:, -1].float()  # (b, V): sampling and guidance in fp32 for a bf16 LM

    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """inputs_embeds (b, t, c), attention_mask (b, t) (left padding, 1 = real) -> (b, V) logits."""
        if inputs_embeds.shape[:2] != attention_mask.shape:
            raise ValueError(
                f"inputs_embeds {tuple(inputs_embeds.shape)} and attention_mask {tuple(attention_mask.shape)} differ"
            )
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("the prompt batch must be left-padded: every row's last slot must be a real token")
        self.cache = None
        self.attention_mask = attention_mask.long()
        self.inputs_embeds = None if self.use_cache else inputs_embeds
        return self._forward(
            inputs_embeds=inputs_embeds,
            attention_mask=self.attention_mask,
            position_ids=position_ids_from_attention_mask(self.attention_mask),
        )

    def step(self, token_ids: Tensor) -> Tensor:
        """(b,) ids chosen last -> (b, V) logits of the token after them."""
        if self.attention_mask is None:
            raise RuntimeError("call prefill before step")
        mask = self.attention_mask
        position = mask.sum(dim=-1, keepdim=True)  # (b, 1): n real tokens hold positions 0..n-1; the new one is n
        self.attention_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)  # (b, t + k + 1)
        ids = token_ids.to(mask.device).long()[:, None]  # (b, 1)
        if self.use_cache:
            return self._forward(input_ids=ids, attention_mask=self.attention_mask, position_ids=position)
        new = self.lm.get_input_embeddings()(ids)  # (b, 1, c)
        self.inputs_embeds = torch.cat([self.inputs_embeds, new.to(self.inputs_embeds.dtype)], dim=1)
        return self._forward(
            inputs_embeds=self.inputs_embeds,
            attention_mask=self.attention_mask,
            position_ids=position_ids_from_attention_mask(self.attention_mask),
        )
