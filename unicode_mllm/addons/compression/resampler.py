"""Learned-query resamplers: a BLIP-2 style Q-Former (`qformer`) and Flamingo's Perceiver Resampler (`perceiver`).

Both read the visual tokens only through cross-attention, which is invariant to permuting the tokens: on
code embeddings (no 2-D position of their own) the layout would be lost. So the tokens first pass a
LayerNorm and then get a fixed 2-D sin-cos table added (`pos_emb='2d_sincos'`, the default; 'none' keeps
the permutation invariance, for ablations and tests). The LayerNorm makes the content and the table
(per-element RMS about 0.7) comparable in scale whatever the LLM's embedding norm is (about 1 per
*token* for LLaMA, i.e. far below the table's per-token norm sqrt(c/2)).

The output is a fixed number of tokens with no grid (`grid_hw=None`). No dropout anywhere.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from unicode_mllm.addons.compression.base import Compressor, register_compressor
from unicode_mllm.addons.compression.grid_layout import check_grid_hw
from unicode_mllm.addons.compression.position import sincos_2d
from unicode_mllm.errors import ConfigError

PosEmb = Literal["2d_sincos", "none"]
POS_EMBS: tuple[str, ...] = ("2d_sincos", "none")
BERT_LAYER_NORM_EPS = 1e-12  # BLIP-2's Q-Former is a BERT: its LayerNorms use eps 1e-12


def _positive_int(owner: str, label: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner} {label} must be a positive int, got {value!r}")
    return value


class _VisualMemory(nn.Module):
    """LayerNorm over c_in, then + fixed 2-D sin-cos position: (b, h*w, c_in) -> (b, h*w, c_in)."""

    def __init__(self, owner: str, width: int, pos_emb: PosEmb):
        super().__init__()
        if pos_emb not in POS_EMBS:
            raise ConfigError(f"{owner} pos_emb {pos_emb!r} is unknown; choose one of {list(POS_EMBS)}")
        if pos_emb == "2d_sincos" and width % 4:
            raise ConfigError(f"{owner} pos_emb='2d_sincos' needs an input width divisible by 4, got {width}")
        self.pos_emb = pos_emb
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        memory = self.norm(tokens)
        if self.pos_emb == "2d_sincos":
            memory = memory + sincos_2d(grid_hw, tokens.shape[-1]).to(device=tokens.device, dtype=memory.dtype)
        return memory


class _BertAttention(nn.Module):
    """Post-LN attention block of BERT / the Q-Former: LayerNorm(x + dense(MHA(x, memory))).

    x: (b, t, d) queries; memory: (b, s, d_mem) keys/values (memory = x for self-attention).
    """

    def __init__(self, width: int, memory_width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(memory_width, width)
        self.value = nn.Linear(memory_width, width)
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=BERT_LAYER_NORM_EPS)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        q, k, v = (
            rearrange(t, "b t (n e) -> b n t e", n=self.num_heads)
            for t in (self.query(x), self.key(memory), self.value(memory))
        )
        attended = rearrange(F.scaled_dot_product_attention(q, k, v), "b n t e -> b t (n e)")
        return self.norm(x + self.dense(attended))


class _QFormerLayer(nn.Module):
    """Self-attention over the queries, optional cross-attention to the visual memory, the query FFN (post-LN)."""

    def __init__(self, width: int, memory_width: int, num_heads: int, has_cross_attention: bool):
        super().__init__()
        self.self_attention = _BertAttention(width, width, num_heads)
        self.cross_attention = _BertAttention(width, memory_width, num_heads) if has_cross_attention else None
        self.ffn_in = nn.Linear(width, 4 * width)
        self.ffn_out = nn.Linear(4 * width, width)
        self.ffn_norm = nn.LayerNorm(width, eps=BERT_LAYER_NORM_EPS)

    def forward(self, queries: Tensor, memory: Tensor) -> Tensor:
        queries = self.self_attention(queries, queries)
        if self.cross_attention is not None:
            queries = self.cross_attention(queries, memory)
        return self.ffn_norm(queries + self.ffn_out(F.gelu(self.ffn_in(queries))))


@register_compressor("qformer")
class QFormer(Compressor):
    """A BLIP-2 Q-Former over the code grid (queries only, no text branch), then Linear(d, llm_width).

    (b, h*w, c_in) -> memory = LN(tokens) + sincos (b, h*w, c_in); queries (num_queries, d) ~ N(0, 0.02)
    -> LayerNorm -> num_layers x [self-attn, cross-attn to memory in layers l % cross_attention_freq == 0
    (from layer 0), FFN d -> 4d -> d], all post-LN with eps 1e-12 -> (b, num_queries, d) -> Linear
    -> (b, num_queries, llm_width). Defaults are BLIP-2's (32 queries, 12 layers, width 768, 12 heads,
    cross-attention every 2nd layer). input_width: c_in, default llm_width.
    """

    def __init__(
        self,
        llm_width: int,
        num_queries: int = 32,
        num_layers: int = 12,
        hidden_width: int = 768,
        num_heads: int = 12,
        cross_attention_freq: int = 2,
        pos_emb: PosEmb = "2d_sincos",
        input_width: int | None = None,
    ):
        in_width = llm_width if input_width is None else input_width
        super().__init__(in_width, llm_width)
        self.num_queries = _positive_int("qformer", "num_queries", num_queries)
        _positive_int("qformer", "num_layers", num_layers)
        _positive_int("qformer", "hidden_width", hidden_width)
        _positive_int("qformer", "num_heads", num_heads)
        _positive_int("qformer", "cross_attention_freq", cross_attention_freq)
        if hidden_width % num_heads:
            raise ConfigError(f"qformer hidden_width {hidden_width} is not divisible by num_heads {num_heads}")
        self.memory = _VisualMemory("qformer", in_width, pos_emb)
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_width) * 0.02)
        self.query_norm = nn.LayerNorm(hidden_width, eps=BERT_LAYER_NORM_EPS)
        self.layers = nn.ModuleList(
            _QFormerLayer(hidden_width, in_width, num_heads, layer % cross_attention_freq == 0)
            for layer in range(num_layers)
        )
        self.proj = nn.Linear(hidden_width, llm_width)

    def output_grid(self, h: int, w: int) -> None:
        return None

    def num_output_tokens(self, h: int, w: int) -> int:
        check_grid_hw((h, w))
        return self.num_queries

    def _compress(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        memory = self.memory(tokens, grid_hw)  # (b, h*w, c_in)
        queries = self.query_norm(self.queries).expand(tokens.shape[0], -1, -1)  # (b, q, d)
        for layer in self.layers:
            queries = layer(queries, memory)
        return self.proj(queries)  # (b, q, llm_width)


class _PerceiverAttention(nn.Module):
    """Flamingo's `PerceiverAttention`: q from the latents, k/v from [media; latents], bias-free projections.

    media: (b, s, d), latents: (b, q, d) -> (b, q, d). Separate LayerNorms for media and latents.
    """

    def __init__(self, width: int, num_heads: int, head_width: int):
        super().__init__()
        inner = num_heads * head_width
        self.num_heads = num_heads
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)  # (b, s+q, inner) each
        q, k, v = (rearrange(t, "b t (n e) -> b n t e", n=self.num_heads) for t in (self.to_q(latents), k, v))
        attended = F.scaled_dot_product_attention(q, k, v)  # scale head_width ** -0.5
        return self.to_out(rearrange(attended, "b n t e -> b t (n e)"))


class _PerceiverFeedForward(nn.Sequential):
    """LayerNorm -> Linear(d, 4d) -> GELU -> Linear(4d, d), bias-free (Flamingo's `FeedForward`, mult 4)."""

    def __init__(self, width: int):
        super().__init__(
            nn.LayerNorm(width),
            nn.Linear(width, 4 * width, bias=False),
            nn.GELU(),
            nn.Linear(4 * width, width, bias=False),
        )


@register_compressor("perceiver")
class PerceiverResampler(Compressor):
    """Flamingo's Perceiver Resampler over the code grid, then Linear(c_in, llm_width).

    (b, h*w, c_in) -> media = LN(tokens) + sincos; latents (num_latents, c_in) ~ N(0, 1)
    -> depth x [latents += attn(media, latents); latents += ffn(latents)] -> LayerNorm
    -> (b, num_latents, c_in) -> Linear -> (b, num_latents, llm_width). Defaults are open_flamingo's
    (64 latents, depth 6, 8 heads of width 64). Single image: no time or frame embeddings.
    """

    def __init__(
        self,
        llm_width: int,
        num_latents: int = 64,
        depth: int = 6,
        num_heads: int = 8,
        head_width: int = 64,
        pos_emb: PosEmb = "2d_sincos",
        input_width: int | None = None,
    ):
        in_width = llm_width if input_width is None else input_width
        super().__init__(in_width, llm_width)
        self.num_latents = _positive_int("perceiver", "num_latents", num_latents)
        _positive_int("perceiver", "depth", depth)
        _positive_int("perceiver", "num_heads", num_heads)
        _positive_int("perceiver", "head_width", head_width)
        self.memory = _VisualMemory("perceiver", in_width, pos_emb)
        self.latents = nn.Parameter(torch.randn(num_latents, in_width))
        self.layers = nn.ModuleList(
            nn.ModuleList([_PerceiverAttention(in_width, num_heads, head_width), _PerceiverFeedForward(in_width)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(in_width)
        self.proj = nn.Linear(in_width, llm_width)

    def output_grid(self, h: int, w: int) -> None:
        return None

    def num_output_tokens(self, h: int, w: int) -> int:
        check_grid_hw((h, w))
        return self.num_latents

    def _compress(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        media = self.memory(tokens, grid_hw)  # (b, h*w, c_in)
        latents = self.latents.expand(tokens.shape[0], -1, -1)  # (b, q, c_in)
        for attention, feed_forward in self.layers:
            latents = attention(media, latents) + latents
            latents = feed_forward(latents) + latents
        return self.proj(self.norm(latents))  # (b, q, llm_width)
