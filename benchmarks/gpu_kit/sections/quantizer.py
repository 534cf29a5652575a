"""Section quantizer: one quantizer training step, native and library backends (bench_quantizer.py's worker)."""

from __future__ import annotations

from gpu_kit.context import SectionContext, free_memory

TITLE = "quantizer training step at LLM scale (native vs library backend)"
HOW = (
    "benchmarks/bench_quantizer.py's worker, in this process, once per backend: forward of (1, N, in_channels) "
    "features through proj_in, D residual layers over one shared (V, C) codebook (a random unit-norm table "
    "installed as C_L), proj_out; loss = MSE + commitment; backward; the EMA update (no optimizer step). fp32, as "
    "the quantizer always runs. Median and min wall time per step after the warm-up steps (CUDA synchronised); "
    "tokens/s = N / median; peak step memory = torch.cuda.max_memory_allocated() minus the memory allocated before "
    "the first step (CPU: the rise in peak RSS). The first step's codes of the two backends are compared (same "
    "seed and codebook: they should be equal)."
)

IMPLS = ("native", "library")


def run(ctx: SectionContext) -> None:
    import bench_quantizer

    s = ctx.settings
    results = {}
    for impl in IMPLS:
        argv = ["--worker", impl, "--size", s["size"], "--device", ctx.device.type, "--tokens", str(s["tokens"])]
        argv += ["--depth", str(s["depth"]), "--in-channels", str(s["in_channels"]), "--warmup", str(s["warmup"])]
        argv += ["--repeats", str(s["repeats"]), "--min-seconds", "0"]
        r = bench_quantizer.run_worker(bench_quantizer.build_parser().parse_args(argv))
        results[impl] = r
        shape = {"tokens": r["tokens"], "codes_x_width": f"{r['num_codes']}x{r['width']}", "depth": r["depth"]}
        ctx.figure(f"{impl}_median_step", 1e3 * r["median_s"], "ms", steps_timed=len(r["times_s"]), **shape)
        ctx.figure(f"{impl}_min_step", 1e3 * r["min_s"], "ms", **shape)
        ctx.figure(f"{impl}_tokens_per_s", r["tokens"] / r["median_s"], "tokens/s", **shape)
        ctx.figure(f"{impl}_peak_step_memory", r["peak_step_mb"], "MiB", **shape)
        ctx.figure(f"{impl}_distinct_codes_first_step", r["distinct_codes"], "codes", **shape)
        free_memory(ctx.device)
    same = results["native"]["codes_sha1"] == results["library"]["codes_sha1"]
    ctx.figure("native_over_library_speed", results["library"]["median_s"] / results["native"]["median_s"], "x")
    ctx.note(f"first-step codes of native and library {'are identical' if same else 'DIFFER'}")
