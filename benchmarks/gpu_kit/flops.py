"""FLOP and byte counts of a LLaMA shape: the numerators of MFU and of the memory-bandwidth bound of decoding.

Shapes are `LlamaConfig` keyword dicts (hidden_size h, num_hidden_layers L, num_attention_heads, optional
num_key_value_heads, intermediate_size i, vocab_size V), as in benchmarks/bench_stage2_step.py's SHAPES.
"""

from __future__ import annotations

from typing import Any


def layer_linears(shape: dict[str, Any]) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's linear layers: q, k, v, o, gate, up, down."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    heads = shape["num_attention_heads"]
    kv = (shape.get("num_key_value_heads") or heads) * (h // heads)  # width of k and v
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def linear_params(shape: dict[str, Any]) -> int:
    """Weights of every matmul of a forward: L layers' linears + the LM head (h x V). The input embedding is a
    gather, not a matmul, and is not counted."""
    per_layer = sum(a * b for a, b in layer_linears(shape))
    return shape["num_hidden_layers"] * per_layer + shape["hidden_size"] * shape["vocab_size"]


def lora_params(shape: dict[str, Any], r: int) -> int:
    """Adapter weights of peft's "all-linear" (every layer linear, not the LM head): r * (in + out) each."""
    return shape["num_hidden_layers"] * sum(r * (a + b) for a, b in layer_linears(shape))


def attention_flops_per_token(shape: dict[str, Any], seq_len: int) -> int:
    """QK^T and AV of a training step per token, PaLM's count: 12 * L * h * s (forward 4Lhs over the full s x s
    scores, no causal halving; backward twice that, both operands being activations)."""
    return 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq_len


def lora_step_flops_per_token(shape: dict[str, Any], r: int, seq_len: int) -> int:
    """FLOPs per token of a LoRA training step on a frozen base:
        4 * N_lin      the frozen base: forward (2 N) + input gradients (2 N), no weight gradients;
      + 6 * N_lora     the adapters: forward, input and weight gradients;
      + 12 * L * h * s attention scores (`attention_flops_per_token`).
    Activation-checkpointing recompute is not counted (MFU counts the model's FLOPs, not the hardware's)."""
    return 4 * linear_params(shape) + 6 * lora_params(shape, r) + attention_flops_per_token(shape, seq_len)


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the chip's dense bf16 peak."""
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)


def kv_cache_bytes_per_position(shape: dict[str, Any], bytes_per_value: int) -> int:
    """K and V of every layer for one position of one row."""
    h, heads = shape["hidden_size"], shape["num_attention_heads"]
    kv = (shape.get("num_key_value_heads") or heads) * (h // heads)
    return 2 * shape["num_hidden_layers"] * kv * bytes_per_value
