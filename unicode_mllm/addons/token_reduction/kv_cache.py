"""`ReducedKVCache`: a KV cache whose layers hold different token sets, plus MustDrop's output-aware pruning.

After in-LM pruning, layer l has processed its own set of tokens, so a single (b, L) mask cannot describe
the cache. Each layer here keeps its own keys and values (b, kv_heads, L_l, d), a validity mask (b, L_l)
(left padding inside a layer) and the source column (b, L_l) of every row (its column in the prefill
input; decoded tokens continue the numbering), so the decode loop builds a per-layer mask and position.

The HF attention modules only call `update(key_states, value_states, layer_idx)` on the cache they are
given (transformers 5.x `LlamaAttention.forward`), which is all this class provides to them; the rest is
used by `prefill.py` / `decode.py`, never by HF code.

KV policies (`TokenReductionConfig.kv_policy`):
- `layerwise`: a layer caches exactly the tokens it processed, so decoding attends like prefill did;
- `final_set` (MustDrop stage 3, "output-aware cache"): from the first pruning layer on, every layer keeps
  only the rows of tokens that survive *all* pruning stages (`keep_final_set`); earlier layers keep all.
  After liuting20/MustDrop@909afa5 `modelling_sparse_llama.py` (the backward composition of
  `final_indices` at the end of `LlamaDynamicvitModel.forward`), re-implemented from reading; its
  hard-coded 32 layers and batch 1 are not copied: rows are matched by source column per sample.

Decode positions (`position_policy`): `keep_original`: next_position + number of tokens decoded so far, the
same at every layer; `renumber`: the number of real rows in that layer's cache (the reference rule).
"""

from __future__ import annotations

import torch
from torch import Tensor

from unicode_mllm.addons.token_reduction.config import KVPolicy, PositionPolicy
from unicode_mllm.addons.token_reduction.image_tokens import compact_rows, gather_rows

KV_POLICIES: tuple[str, ...] = ("layerwise", "final_set")


class ReducedKVCache:
    """Per-layer K/V with per-layer token sets. Shapes: keys[l], values[l] (b, kv_heads, L_l, d)."""

    def __init__(self, num_layers: int, position_policy: PositionPolicy, next_position: Tensor):
        self.num_layers = num_layers
        self.position_policy = position_policy
        self.next_position = next_position  # (b,) long: position of the first decoded token (keep_original)
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.valid: list[Tensor | None] = [None] * num_layers  # (b, L_l) bool
        self.source: list[Tensor | None] = [None] * num_layers  # (b, L_l) long, -1 on padding
        self.num_decoded = 0
        self.prompt_length = 0  # columns of the prefill input; decoded token k gets source prompt_length + k

    # ----- the one method HF attention calls --------------------------------------------------------

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """Append (b, kv_heads, n, d) keys and values to layer `layer_idx`; return the layer's full K and V."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    # ----- bookkeeping for prefill / decode ----------------------------------------------------------

    def add_rows(self, layer_idx: int, valid: Tensor, source: Tensor) -> None:
        """Record validity (b, n) and source columns (b, n) of the rows the last `update` appended."""
        if self.valid[layer_idx] is None:
            self.valid[layer_idx], self.source[layer_idx] = valid, source
        else:
            self.valid[layer_idx] = torch.cat([self.valid[layer_idx], valid], dim=1)
            self.source[layer_idx] = torch.cat([self.source[layer_idx], source], dim=1)
        keys = self.keys[layer_idx]
        assert keys is not None and keys.shape[2] == self.valid[layer_idx].shape[1], (
            f"layer {layer_idx}: keys {None if keys is None else tuple(keys.shape)} but "
            f"{self.valid[layer_idx].shape[1]} recorded rows"
        )

    def lengths(self) -> list[int]:
        """Padded cache length of every layer."""
        return [0 if k is None else k.shape[2] for k in self.keys]

    def num_real(self, layer_idx: int) -> Tensor:
        """(b,) long: real (non-padding) rows cached at `layer_idx`."""
        valid = self.valid[layer_idx]
        assert valid is not None, f"layer {layer_idx} holds no rows yet"
        return valid.sum(dim=-1)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Padded length of one layer (the name HF caches use)."""
        return self.lengths()[layer_idx]

    def decode_positions(self, layer_idx: int) -> Tensor:
        """(b,) long: the RoPE position of the next decoded token at `layer_idx` under the position policy."""
        if self.position_policy == "keep_original":
            return self.next_position + self.num_decoded
        return self.num_real(layer_idx)

    def keep_final_set(self, final_source: Tensor, final_valid: Tensor, from_layer: int) -> None:
        """Output-aware pruning: layers >= from_layer keep only rows whose source is in the final set.

        final_source, final_valid: (b, t_f) the source columns of the tokens that left the last layer.
        Every layer's set contains the final set, so all pruned layers end with the same per-row counts.
        """
        for layer in range(from_layer, self.num_layers):
            source, valid = self.source[layer], self.valid[layer]
            assert source is not None and valid is not None, f"layer {layer} holds no rows"
            hit = (source[:, :, None] == final_source[:, None, :]) & final_valid[:, None, :]  # (b, L_l, t_f)
            keep = valid & hit.any(dim=-1)
            assert torch.equal(keep.sum(dim=-1), final_valid.sum(dim=-1)), (
                f"layer {layer}: the final set {final_valid.sum(dim=-1).tolist()} is not inside the cached "
                f"set {keep.sum(dim=-1).tolist()}"
            )
            index, new_valid = compact_rows(keep)
            self.keys[layer] = gather_rows(self.keys[layer].transpose(1, 2), index).transpose(1, 2)
            self.values[layer] = gather_rows(self.values[layer].transpose(1, 2), index).transpose(1, 2)
            self.valid[layer] = new_valid
            self.source[layer] = gather_rows(source, index, fill=-1)


def check_kv_policy(policy: str) -> None:
    if policy not in KV_POLICIES:
        raise ValueError(f"kv_policy {policy!r} is unknown; choose one of {list(KV_POLICIES)}")


def apply_kv_policy(
    cache: ReducedKVCache, policy: KVPolicy, pruning_layers: tuple[int, ...], final_source: Tensor, final_valid: Tensor
) -> None:
    """Apply `policy` to a cache fresh from prefill (`layerwise` leaves it as it is)."""
    check_kv_policy(policy)
    if policy == "final_set" and pruning_layers:
        cache.keep_final_set(final_source, final_valid, from_layer=pruning_layers[0])
