"""Section lora_step: the 7B LoRA stage-2 training step (bench_stage2_step.py), with and without checkpointing."""

from __future__ import annotations

import statistics

import torch

from gpu_kit import chips
from gpu_kit.context import SectionContext, free_memory, one_line, peak_memory_gib, reset_peak_memory
from gpu_kit.flops import linear_params, lora_params, lora_step_flops_per_token, mfu

TITLE = "stage-2 LoRA training step at a 7B LLaMA shape (random weights)"
HOW = (
    "benchmarks/bench_stage2_step.py's model and step: a LLaMA causal LM of the named shape built on the device, "
    "its frozen base in bf16 (train-mllm's LoRA under bf16), the project's LoRA adapters (LoraSettings: r 128, "
    "alpha 256, dropout 0.05, every linear layer but the LM head) and a trainable embedding table "
    "(configs/mllm/vicuna7b_lora.yaml), both in fp32; one step = "
    "forward + backward under bf16 autocast with the next-token loss on every position, then fused AdamW. "
    "tokens/s = batch * seq_len / median step time. MFU = tokens/s * F / peak, F per token = 4 * N_lin + 6 * "
    "N_lora + 12 * L * h * s (N_lin: every matmul weight of the frozen base incl. the LM head, forward and input "
    "gradient, no weight gradient; N_lora: adapter weights, forward + both gradients; attention scores counted "
    "over the full s x s as in PaLM; checkpointing's recompute not counted) against the chip's dense bf16 peak. "
    "For comparison, mfu_as_full_finetune uses 6 * N * tokens (N = all parameters). Peak memory = "
    "torch.cuda.max_memory_allocated over the attempt (weights, optimizer state, activations). The batch is halved "
    "after an out-of-memory error, and a smaller shape is tried when batch 1 does not fit; every such fallback is "
    "labelled."
)


def run(ctx: SectionContext) -> None:
    import bench_stage2_step as bench

    from unicode_mllm.model.mllm import LoraSettings
    from unicode_mllm.runtime.devices import select_dtype

    s = ctx.settings
    lora = LoraSettings()
    dtype = select_dtype(s["compute_dtype"], ctx.device)
    base_dtype = bench.frozen_dtype(True, dtype)
    ctx.setting(lora={"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": lora.target_modules})
    ctx.setting(
        compute_dtype=str(dtype).removeprefix("torch."),
        base_dtype=str(base_dtype).removeprefix("torch."),
        trainable_dtype="float32",
    )
    spec = chips.chip_spec(chips.device_name(ctx.device))  # None for a CPU or an unknown card
    if spec is None:
        ctx.note("no datasheet peak for this device: MFU not computed")
    for checkpointing in s["checkpointing"]:
        label = "checkpointing" if checkpointing else "no_checkpointing"
        fitted = False
        for shape_name in s["shapes"]:
            fitted = _try_shape(ctx, bench, shape_name, checkpointing, dtype, base_dtype, spec, lora.r, label)
            if fitted:
                break
        if not fitted:
            ctx.note(f"{label}: no shape of {s['shapes']} fit (or the time ran out)")


def _batches(batch: int) -> list[int]:
    out = [batch]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _try_shape(ctx, bench, shape_name: str, checkpointing: bool, dtype, base_dtype, spec, r: int, label: str) -> bool:
    """Build `shape_name` and time the largest batch of the ladder that fits; True when one fit."""
    s = ctx.settings
    if ctx.seconds_left() < s["min_seconds_to_try"]:
        ctx.note(f"{label}: {shape_name} not tried, {ctx.seconds_left():.0f} s left of the section's time")
        return False
    shape = bench.SHAPES[shape_name]
    torch.manual_seed(0)
    try:
        lm = bench.build_lm(shape_name, s["seq_len"], ctx.device, True, checkpointing, base_dtype)
    except torch.OutOfMemoryError as error:
        ctx.note(f"{label}: {shape_name} does not fit to build: {one_line(error)}")
        free_memory(ctx.device)
        return False
    total = sum(p.numel() for p in lm.parameters())
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    expected = lora_params(shape, r) + shape["hidden_size"] * shape["vocab_size"]  # adapters + embedding table
    if trainable != expected:
        ctx.note(f"{shape_name}: {trainable} trainable parameters, the FLOP formula's count is {expected}")
    try:
        for batch in _batches(s["batch"]):
            if ctx.seconds_left() < s["min_seconds_to_try"]:
                ctx.note(f"{label}: {shape_name} batch {batch} not tried: {ctx.seconds_left():.0f} s left")
                return False
            reset_peak_memory(ctx.device)
            oom = None
            try:
                times = bench.time_steps(lm, batch, s["seq_len"], dtype, s["warmup"], s["steps"])
            except torch.OutOfMemoryError as error:
                oom = one_line(error)
            if oom is not None:  # out of the except block: its traceback (and the activations) is released
                ctx.note(f"{label}: {shape_name} batch {batch} x {s['seq_len']}: {oom}")
                lm.zero_grad(set_to_none=True)
                free_memory(ctx.device)
                continue
            _record(ctx, shape_name, shape, batch, checkpointing, times, spec, r, label, total, trainable)
            return True
        return False
    finally:
        del lm
        free_memory(ctx.device)


def _record(ctx, shape_name, shape, batch, checkpointing, times, spec, r, label, total, trainable) -> None:
    s = ctx.settings
    seq_len = s["seq_len"]
    median = statistics.median(times)
    tokens_per_s = batch * seq_len / median
    fallback = shape_name != s["shapes"][0] or batch != s["batch"]
    where = {
        "shape": shape_name,
        "batch": batch,
        "seq_len": seq_len,
        "activation_checkpointing": checkpointing,
        "fallback": fallback,
    }
    if fallback:
        where["asked"] = f"{s['shapes'][0]} at batch {s['batch']}"
        ctx.note(f"{label}: FALLBACK to {shape_name} at batch {batch} (asked {where['asked']})")
    ctx.figure(f"{label}_parameters", total, "parameters", trainable=trainable, **where)
    ctx.figure(f"{label}_median_step", median, "s", steps_timed=len(times), min_step_s=min(times), **where)
    ctx.figure(f"{label}_tokens_per_s", tokens_per_s, "tokens/s", **where)
    peak = peak_memory_gib(ctx.device)
    if peak is not None:
        ctx.figure(f"{label}_peak_memory", peak, "GiB", **where)
    flops = lora_step_flops_per_token(shape, r, seq_len)
    ctx.figure(
        f"{label}_flops_per_token",
        flops,
        "FLOP/token",
        formula="4*N_lin + 6*N_lora + 12*L*h*s",
        n_lin=linear_params(shape),
        n_lora=lora_params(shape, r),
        **where,
    )
    if spec is not None:
        ctx.figure(
            f"{label}_mfu", 100 * mfu(flops, tokens_per_s, spec.bf16_dense_tflops), "%", peak=spec.label, **where
        )
        full = 100 * mfu(6 * total, tokens_per_s, spec.bf16_dense_tflops)
        ctx.figure(f"{label}_mfu_as_full_finetune", full, "%", formula="6*N*tokens", peak=spec.label, **where)
