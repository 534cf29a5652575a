"""Side by side: the native quantizer's nearest-code search with an fp32 and a bf16 distance matmul.

One call = `nearest_codes(x, codebook)` for `--tokens` rows against a (V, C) codebook (default 32000 x 4096,
the 256 px tokenizer's LLaMA-7B codebook), `--chunk` rows per distance chunk, ||e||^2 precomputed (as the
quantizer does once per step), the bf16 copy of the codebook made once outside the timing (as the
quantizer does once per call for all its layers). fp32 and bf16 run in turns in one process (round-robin,
`--repeats` rounds after one warm-up round); reported: median ms per call of each, the ratio fp32/bf16 (> 1:
bf16 faster), and `search_agreement` (the fraction of rows whose bf16 code equals the fp32 code) on two
samples: `random` (Gaussian rows at the codebook's norm: near-ties everywhere, the worst case) and
`near_code` (a code plus noise of half its norm, like a feature the codebook fits).

The codebook is random unit-norm rows x 0.3 (about the scale of an LLM's embedding rows).

Threads: pass `--threads 1` on a small shared CPU (see bench_quantizer.py).

Usage (CPU: about 2 minutes on 1 thread):
    python benchmarks/bench_code_search.py --threads 1
On a GPU (not run yet; bf16 there is the tensor-core matmul with fp32 output):
    python benchmarks/bench_code_search.py --device cuda --tokens 8192 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unicode_mllm.visual_tokenizer.native_quantizer import (
    DEFAULT_CHUNK_SIZE,
    nearest_codes,
    search_agreement,
    squared_norms,
)


def parse_size(text: str) -> tuple[int, int]:
    num_codes, width = (int(part) for part in text.lower().split("x"))
    return num_codes, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=parse_size, default=(32000, 4096), help="codes x width, e.g. 32000x4096")
    parser.add_argument("--tokens", type=int, default=1024, help="rows searched per call")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_SIZE, help="rows per distance chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--agreement-sample", type=int, default=1024, help="rows per agreement sample")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a small shared CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    v, c = args.size
    g = torch.Generator().manual_seed(0)
    codebook = (torch.nn.functional.normalize(torch.randn(v, c, generator=g), dim=-1) * 0.3).to(device)
    x = (torch.nn.functional.normalize(torch.randn(args.tokens, c, generator=g), dim=-1) * 0.3).to(device)
    sq_norm = squared_norms(codebook)
    inputs = {"fp32": codebook, "bf16": codebook.to(torch.bfloat16)}
    seconds: dict[str, list[float]] = {name: [] for name in inputs}
    codes = {}
    with torch.inference_mode():
        for round_ in range(args.repeats + 1):
            for name, rows in inputs.items():
                start = time.perf_counter()
                codes[name] = nearest_codes(
                    x, rows, chunk_size=args.chunk, codebook_sq_norm=sq_norm, search_dtype=name
                ).cpu()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if round_ > 0:
                    seconds[name].append(time.perf_counter() - start)
        m = args.agreement_sample
        picks = torch.randint(0, v, (m,), generator=g)
        near = codebook[picks.to(device)] + 0.15 * torch.nn.functional.normalize(
            torch.randn(m, c, generator=g), dim=-1
        ).to(device)
        agreement = {
            "random": search_agreement(x, codebook, search_dtype="bf16", sample=m, chunk_size=args.chunk),
            "near_code": search_agreement(near, codebook, search_dtype="bf16", sample=m, chunk_size=args.chunk),
        }
    ms = {name: 1e3 * statistics.median(s) for name, s in seconds.items()}
    row = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine() + " cpu",
        "threads": torch.get_num_threads(),
        "codes": v,
        "width": c,
        "tokens": args.tokens,
        "chunk": args.chunk,
        "fp32_ms": round(ms["fp32"], 1),
        "bf16_ms": round(ms["bf16"], 1),
        "fp32_over_bf16": round(ms["fp32"] / ms["bf16"], 3),
        "timed_call_agreement": float((codes["fp32"] == codes["bf16"]).float().mean()),
        "agreement_random": round(agreement["random"], 4),
        "agreement_near_code": round(agreement["near_code"], 4),
        "repeats": args.repeats,
    }
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
