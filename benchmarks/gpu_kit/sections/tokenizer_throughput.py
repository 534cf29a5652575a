"""Section tokenizer_throughput: encode and decode images/s of the 256 px visual tokenizer (llama7b_256 shape)."""

from __future__ import annotations

import statistics
import time

import torch

from gpu_kit.context import SectionContext, peak_memory_gib, reset_peak_memory, synchronize

TITLE = "visual tokenizer throughput at 256 px (configs/tokenizer/llama7b_256.yaml's model)"
HOW = (
    "A VisualTokenizer of the preset's model shape (random weights) whose codebook is a random (V, C) table of the "
    "7B LLM's size (gpu_kit/visual_tokenizers.py), eval mode, on random images in [-1, 1]. encode = "
    "VisualTokenizer.encode (fp32 by design: codes must not depend on autocast) -> (b, h, w, d) codes; decode = "
    "VisualTokenizer.decode of those codes in fp32 (as generation's decode_token_ids) and under bf16 autocast. "
    "images/s = batch / median wall time of a call (CUDA synchronised) after the warm-up calls; round trip = "
    "batch / (median encode + median decode). Peak memory = torch.cuda.max_memory_allocated over the timed calls."
)


def _median_seconds(fn, warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(ctx: SectionContext) -> None:
    from gpu_kit.visual_tokenizers import build_visual_tokenizer, preset_config

    s = ctx.settings
    cfg = preset_config(s["preset"], s["overrides"])
    rows, width = s["codebook"]
    table = 0.02 * torch.randn(rows, width, generator=torch.Generator().manual_seed(0))  # (V, C), LLaMA's init scale
    vt = build_visual_tokenizer(cfg, table, range(rows)).to(ctx.device).eval()
    size, b = cfg.model.image_size, s["batch"]
    pixels = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(1))  # (b, 3, H, W) in [0, 1]
    images = (2 * pixels - 1).to(ctx.device)  # the tokenizer's [-1, 1]
    shape = {"image_size": size, "batch": b, "code_shape": list(vt.code_shape), "codebook": f"{rows}x{width}"}
    ctx.setting(tokenizer_parameters_m=round(sum(p.numel() for p in vt.parameters()) / 1e6, 2), shape=shape)
    reset_peak_memory(ctx.device)
    codes = vt.encode(images)  # (b, h, w, d) int64
    encode_s = _median_seconds(lambda: vt.encode(images), s["warmup"], s["repeats"], ctx.device)
    ctx.figure("encode_images_per_s", b / encode_s, "images/s", dtype="fp32", **shape)
    decode_s = _median_seconds(lambda: vt.decode(codes), s["warmup"], s["repeats"], ctx.device)
    ctx.figure("decode_images_per_s", b / decode_s, "images/s", dtype="fp32", **shape)
    ctx.figure("round_trip_images_per_s", b / (encode_s + decode_s), "images/s", dtype="fp32", **shape)

    def decode_bf16() -> None:
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            vt.decode(codes)

    bf16_s = _median_seconds(decode_bf16, s["warmup"], s["repeats"], ctx.device)
    ctx.figure("decode_images_per_s_bf16_autocast", b / bf16_s, "images/s", dtype="bf16 autocast", **shape)
    peak = peak_memory_gib(ctx.device)
    if peak is not None:
        ctx.figure("peak_memory", peak, "GiB", **shape)
