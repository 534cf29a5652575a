"""Side by side: one quantizer training step of the library backend, the native backend and raw ResidualVQ.

Exception to the one-adapter rule: this script imports `vector_quantize_pytorch` directly, because the
raw `ResidualVQ` is the peer being compared (configured as `StackedQuantizer._build_library_rvq` does: shared
codebook, decay 0.99, eps 1e-5, commitment weight 0.25, no rotation trick, no dead-code expiry, no
k-means init, dim == codebook_dim, the project's own projections around it and one straight-through
wrap in codebook space). Everything else goes through `StackedQuantizer`.

The three implementations, each timed in its own fresh process:
    (a) library: `StackedQuantizer(backend="library")` (the adapter around ResidualVQ 1.31.0);
    (b) native:  `StackedQuantizer(backend="native")` (chunked argmin search, index_add_ EMA sums);
    (c) raw:     proj_in -> `ResidualVQ` -> one straight-through wrap -> proj_out, no adapter.

One step = forward of (1, N, in_channels) features through proj_in, D residual layers over a
(V, C) codebook, proj_out; loss = mse(reconstruction, input) + commitment loss; backward; the EMA
update of the shared codebook (inside the forward, as in training). No optimizer step. The codebook
is a random unit-norm (V, C) table written with the EMA-consistent install recipe, so the codes
spread over the table like word embeddings would.

Reported per row: the median (and min) wall time of a step after warm-up; the ratio to (c); the peak
step memory, which is
    on CPU:  peak resident set size (VmHWM, reset through /proc/self/clear_refs just before the first
             step) minus the RSS at that moment, over the warm-up and timed steps: the extra memory a
             training step needs on top of the built module and its inputs (allocator caching included);
    on CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the first step
             (tensors only; the caching allocator's reserve is not counted).
and whether the first step's codes equal those of (a) (same seed, same codebook: (a) and (b) should
agree; n/a for (c), which has no norm matching in front of the codebook).

Threads: on a small shared CPU pass `--threads 1`. With torch's default (one per core) and other
jobs on the same cores, every parallel op waits for a descheduled thread (measured on a loaded
2-core box: 100x slower small ops), which measures the scheduler, not the quantizer.

Usage (CPU, the defaults: N=256 tokens, D=4, sizes 512x64 and 32000x4096; about 3 minutes on 1 thread):
    python benchmarks/bench_quantizer.py --threads 1
On a GPU, at LLM scale (8192 tokens; not run yet at the time of writing):
    python benchmarks/bench_quantizer.py --device cuda --tokens 8192 --warmup 3 --repeats 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

IMPLEMENTATIONS = ("library", "native", "raw")
LABELS = {"library": "(a) StackedQuantizer, backend=library", "native": "(b) StackedQuantizer, backend=native"}
LABELS["raw"] = "(c) raw ResidualVQ"


def parse_size(text: str) -> tuple[int, int]:
    """'32000x4096' -> (num_codes, width)."""
    try:
        num_codes, width = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like 32000x4096 (codes x width)") from error
    return num_codes, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens N per step (default 256)")
    parser.add_argument("--depth", type=int, default=4, help="residual layers D (default 4)")
    parser.add_argument(
        "--sizes",
        default="512x64,32000x4096",
        help="comma-separated codebook sizes V x C (default 512x64,32000x4096)",
    )
    parser.add_argument("--in-channels", type=int, default=64, help="feature channels before proj_in (default 64)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps, at least (default 3)")
    parser.add_argument(
        "--min-seconds", type=float, default=2.0, help="keep timing until this much time passed (default 2)"
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per distance chunk of (b) (default 2048)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help="subset of library,native,raw")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=parse_size, help=argparse.SUPPRESS)
    return parser


# ----- the worker: one implementation, one size, in a fresh process ----------------------------


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Linux: writing 5 resets the peak RSS (VmHWM) to the current RSS (proc(5), clear_refs).
    Path("/proc/self/clear_refs").write_text("5")


def _unit_codebook(num_codes: int, width: int):
    import torch
    import torch.nn.functional as F

    rows = torch.randn(num_codes, width, generator=torch.Generator().manual_seed(1))
    return F.normalize(rows, dim=-1)


def _build_adapter(impl: str, num_codes: int, width: int, args: argparse.Namespace):
    import torch
    import torch.nn.functional as F

    from unicode_mllm.visual_tokenizer import QuantizerSettings, StackedQuantizer

    extra = {} if args.chunk_size is None else {"native_chunk_size": args.chunk_size}
    torch.manual_seed(0)
    quantizer = StackedQuantizer(
        in_channels=args.in_channels,
        llm_width=width,
        num_codes=num_codes,
        depth=args.depth,
        settings=QuantizerSettings(backend=impl, **extra),
    )
    quantizer.install(_unit_codebook(num_codes, width))
    quantizer.to(args.device).train()

    def step(z):
        out = quantizer(z)
        loss = F.mse_loss(out.z_q, z) + out.commit_loss
        loss.backward()
        return out.codes

    return quantizer, step


def _build_raw(num_codes: int, width: int, args: argparse.Namespace):
    import torch
    import torch.nn.functional as F
    from torch import nn
    from vector_quantize_pytorch import ResidualVQ  # the peer under comparison (see the docstring)

    torch.manual_seed(0)
    proj_in, proj_out = nn.Linear(args.in_channels, width), nn.Linear(width, args.in_channels)
    rvq = ResidualVQ(
        dim=width,
        num_quantizers=args.depth,
        codebook_size=num_codes,
        shared_codebook=True,
        decay=0.99,
        eps=1e-5,
        commitment_weight=0.25,
        rotation_trick=False,
        threshold_ema_dead_code=0,
        kmeans_init=False,
        quantize_dropout=False,
        sync_codebook=False,
    )
    codebook = rvq.layers[0]._codebook
    with torch.no_grad():  # install: cluster_size is ones, so embed_avg = embed is consistent
        table = _unit_codebook(num_codes, width)[None]
        codebook.embed.copy_(table)
        codebook.embed_avg.copy_(table)
    model = nn.ModuleDict({"proj_in": proj_in, "rvq": rvq, "proj_out": proj_out}).to(args.device).train()

    def step(z):
        x_cb = model["proj_in"](z)
        q_cb, codes, losses = model["rvq"](x_cb)
        q_cb = x_cb + (q_cb - x_cb).detach()  # one straight-through wrap, in codebook space
        loss = F.mse_loss(model["proj_out"](q_cb), z) + losses.sum()
        loss.backward()
        return codes

    return model, step


def run_worker(args: argparse.Namespace) -> dict:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    num_codes, width = args.size
    device = torch.device(args.device)
    is_cuda = device.type == "cuda"
    builders: dict[str, Callable] = {
        "library": lambda: _build_adapter("library", num_codes, width, args),
        "native": lambda: _build_adapter("native", num_codes, width, args),
        "raw": lambda: _build_raw(num_codes, width, args),
    }
    module, step = builders[args.worker]()
    z = torch.randn(1, args.tokens, args.in_channels, generator=torch.Generator().manual_seed(2)).to(device)

    def timed_step() -> tuple[float, object]:
        if is_cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        codes = step(z)
        if is_cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        module.zero_grad(set_to_none=True)
        return elapsed, codes

    if is_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_bytes = torch.cuda.memory_allocated(device)
    else:
        _reset_peak_rss()
        base_rss_kb = _rss_kb("VmRSS")

    first_codes = None
    for _ in range(args.warmup):
        _, codes = timed_step()
        first_codes = codes if first_codes is None else first_codes
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < args.repeats or (time.perf_counter() - started < args.min_seconds and len(times) < 200):
        elapsed, codes = timed_step()
        first_codes = codes if first_codes is None else first_codes
        times.append(elapsed)

    if is_cuda:
        peak_mb = (torch.cuda.max_memory_allocated(device) - base_bytes) / 2**20
    else:
        peak_mb = (_rss_kb("VmHWM") - base_rss_kb) / 2**10
    codes_bytes = first_codes.detach().to("cpu", torch.long).contiguous().numpy().tobytes()
    return {
        "impl": args.worker,
        "num_codes": num_codes,
        "width": width,
        "depth": args.depth,
        "tokens": args.tokens,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_step_mb": peak_mb,
        "codes_sha1": hashlib.sha1(codes_bytes).hexdigest(),
        "distinct_codes": len(set(first_codes.flatten().tolist())),
    }


# ----- the parent: one worker process per (size, implementation), then the table ----------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def run_one(impl: str, size: tuple[int, int], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--size", f"{size[0]}x{size[1]}"]
    for flag, value in (
        ("--device", args.device),
        ("--tokens", args.tokens),
        ("--depth", args.depth),
        ("--in-channels", args.in_channels),
        ("--warmup", args.warmup),
        ("--repeats", args.repeats),
        ("--min-seconds", args.min_seconds),
        ("--chunk-size", args.chunk_size),
        ("--threads", args.threads),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} at {size[0]}x{size[1]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| V x C | D | N | implementation | median step (ms) | min (ms) | vs (c) raw library | "
        "peak step memory (MiB) | codes = (a) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_size: dict[tuple[int, int], dict[str, dict]] = {}
    for result in results:
        by_size.setdefault((result["num_codes"], result["width"]), {})[result["impl"]] = result
    for (num_codes, width), row in by_size.items():
        raw = row.get("raw")
        reference = row.get("library")
        for impl in IMPLEMENTATIONS:
            if impl not in row:
                continue
            r = row[impl]
            ratio = f"{r['median_s'] / raw['median_s']:.2f}x" if raw else "n/a"
            if impl == "raw" or reference is None:
                same = "n/a"  # raw has no norm matching, so its features (and codes) differ by design
            else:
                same = "yes" if r["codes_sha1"] == reference["codes_sha1"] else "no"
            lines.append(
                f"| {num_codes} x {width} | {r['depth']} | {r['tokens']} | {LABELS[impl]} | "
                f"{1e3 * r['median_s']:.1f} | {1e3 * r['min_s']:.1f} | {ratio} | {r['peak_step_mb']:.0f} | {same} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(args)))
        return
    import torch

    impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
    unknown = sorted(set(impls) - set(IMPLEMENTATIONS))
    if unknown:
        raise SystemExit(f"--impls {unknown} unknown; choose from {list(IMPLEMENTATIONS)}")
    sizes = [parse_size(text) for text in args.sizes.split(",")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_model()
    print(f"device: {args.device} ({device_name}), torch {torch.__version__}, load average {os.getloadavg()}")
    results = []
    for size in sizes:
        for impl in impls:
            result = run_one(impl, size, args)
            print(
                f"  {size[0]}x{size[1]} {impl}: median {1e3 * result['median_s']:.1f} ms over "
                f"{len(result['times_s'])} steps, {result['threads']} threads",
                flush=True,
            )
            results.append(result)
    print()
    print(markdown_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
