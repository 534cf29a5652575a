"""Side by side: image-span decoding with the static KV cache, the dynamic KV cache, and HF `generate`.

What one call decodes: a left-padded batch of `--batch` random prompts (lengths spread over
[prompt_len / 2, prompt_len]), then `--span` sampled tokens per row (top-k 50 at temperature 1), as
generation/image_generation.py writes an image span (its span constraint is left out: it is the same in
every row below). With `--cfg` every batch holds 2 x batch rows (conditional rows, then unconditional
ones) and the project rows mix the two halves' logits (guidance.py).

    static:  `IncrementalDecoder(cache_kind="static")`, the default decoder: transformers' StaticCache sized
             prompt + span and a preallocated attention mask (no per-step concatenation); on a CPU the fp32
             linears run through oneDNN on packed weights (`linear_kernels="auto"`, onednn_linears.py);
    sgemm:   the same with PyTorch's default fp32 kernels (`linear_kernels="default"`: the decoder before);
    dynamic: `IncrementalDecoder(cache_kind="dynamic", linear_kernels="default")`: the growing DynamicCache;
    compiled: (with `--compile`) static, every step through `torch.compile` (`compile_step=True`; the warm-up round
             compiles);
    hf:      `lm.generate(do_sample=True, top_k=50, min_new_tokens=max_new_tokens=span)` on the same ids
             (with --cfg: on the 2 x batch rows, unmixed: the same forwards, HF's CFG processor would
             run a second forward per step instead).

The LM is a random LlamaForCausalLM of the named shape (`tiny`: tests/conftest.py's tiny LLaMA's
shape, `small`: configs/lm/small.yaml's, 26M parameters), fp32 on the CPU. They are run in turns in
one process (round-robin, `--repeats` rounds after one warm-up round), so a load change on a shared
machine hits all alike; reported: the median tokens/s (batch * span / wall time) of each and the
ratios static/hf, static/sgemm, sgemm/hf and dynamic/hf of tokens/s (each the median over rounds of the ratio
within one round), and whether static chose the same tokens as sgemm and dynamic (same draws).

Threads: pass `--threads 1` on a small shared CPU (see bench_quantizer.py).

Usage (CPU, 2 cores shared with other jobs; about 4 minutes):
    python benchmarks/bench_image_decoding.py --threads 1 --shapes tiny small --batches 1 8 --span 256
On a GPU (not run yet):
    python benchmarks/bench_image_decoding.py --device cuda --shapes small --batches 1 8 32 --span 256
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unicode_mllm.generation.guidance import mix_guidance
from unicode_mllm.generation.incremental_decoding import IncrementalDecoder
from unicode_mllm.generation.sampling import SamplingSettings, choose_next_tokens, uniform_draws

SHAPES = {
    # tests/conftest.py's tiny LLaMA (hidden 64, 2 layers) is smaller still; this is bench_stage2_step's `tiny`.
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384, vocab_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1408, vocab_size=8192),
}
TOP_K = 50
DECODERS = {  # IncrementalDecoder settings of the project's rows
    "static": dict(cache_kind="static"),  # the default decoder: static cache, oneDNN linears on a CPU (auto)
    "sgemm": dict(cache_kind="static", linear_kernels="default"),  # the same with PyTorch's default fp32 kernels
    "dynamic": dict(cache_kind="dynamic", linear_kernels="default"),  # the growing cache (the decoding before)
    "compiled": dict(cache_kind="static", compile_step=True),  # only with --compile
}
IMPLEMENTATIONS = ("static", "sgemm", "dynamic", "hf")


def build_lm(shape: str, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0)
    return LlamaForCausalLM(config).to(device).eval()


def build_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, prompt_len) ids and mask, left-padded, real lengths spread over [prompt_len / 2, prompt_len]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, prompt_len), generator=g)
    mask = torch.ones(batch, prompt_len, dtype=torch.long)
    for r in range(batch):
        pad = (r * (prompt_len // 2)) // max(batch - 1, 1) if batch > 1 else 0
        mask[r, :pad] = 0
        ids[r, :pad] = 0
    return ids, mask


def project_decode(lm, kind: str, ids, mask, span: int, cfg: bool, uniforms) -> torch.Tensor:
    b = ids.shape[0] // (2 if cfg else 1)
    sampling = SamplingSettings(1.0, top_k=TOP_K)
    decoder = IncrementalDecoder(lm, **DECODERS[kind])
    chosen = torch.empty(b, span, dtype=torch.long, device=ids.device)
    logits = decoder.prefill(lm.get_input_embeddings()(ids), mask, max_new_tokens=span - 1)
    for step in range(span):
        step_logits = mix_guidance(logits, 3.0) if cfg else logits
        next_ids = choose_next_tokens(step_logits, sampling, uniforms[:, step])
        chosen[:, step] = next_ids
        if step + 1 < span:
            logits = decoder.step(next_ids.repeat(2) if cfg else next_ids)
    return chosen.cpu()


def hf_decode(lm, ids, mask, span: int) -> torch.Tensor:
    out = lm.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        top_k=TOP_K,
        top_p=None,
        temperature=1.0,
        max_new_tokens=span,
        min_new_tokens=span,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[:, ids.shape[1] :].cpu()


def run_case(
    lm, device, batch: int, cfg: bool, span: int, prompt_len: int, repeats: int, compile_step: bool = False
) -> dict:
    vocab = lm.config.vocab_size
    ids, mask = build_prompts(batch, prompt_len, vocab, seed=1)
    if cfg:
        uncond_ids, uncond_mask = build_prompts(batch, prompt_len, vocab, seed=2)
        ids, mask = torch.cat([ids, uncond_ids]), torch.cat([mask, uncond_mask])
    ids, mask = ids.to(device), mask.to(device)
    uniforms = uniform_draws(list(range(batch)), span)
    names = IMPLEMENTATIONS + (("compiled",) if compile_step else ())
    calls = {name: functools.partial(project_decode, lm, name, ids, mask, span, cfg, uniforms) for name in DECODERS}
    calls["hf"] = lambda: hf_decode(lm, ids, mask, span)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    tokens: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for round_ in range(repeats + 1):  # round 0 warms up
            for name in names:
                start = time.perf_counter()
                tokens[name] = calls[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if round_ > 0:
                    seconds[name].append(time.perf_counter() - start)
    rate = {name: batch * span / statistics.median(s) for name, s in seconds.items()}

    def paired(a: str, b: str) -> float:  # median over rounds of the ratio within a round (same load)
        return round(statistics.median(sb / sa for sa, sb in zip(seconds[a], seconds[b], strict=True)), 3)

    return {
        "batch": batch,
        "cfg": cfg,
        "rows_per_forward": ids.shape[0],
        "span": span,
        "prompt_len": prompt_len,
        **{f"{name}_tokens_per_s": round(rate[name], 1) for name in names},
        "static_over_hf": paired("static", "hf"),
        "static_over_sgemm": paired("static", "sgemm"),
        "sgemm_over_hf": paired("sgemm", "hf"),
        "dynamic_over_hf": paired("dynamic", "hf"),
        "static_equals_sgemm_tokens": bool(torch.equal(tokens["static"], tokens["sgemm"])),
        "static_equals_dynamic_tokens": bool(torch.equal(tokens["static"], tokens["dynamic"])),
        **(
            {
                "compiled_over_static": paired("compiled", "static"),
                "compiled_over_hf": paired("compiled", "hf"),
                "compiled_equals_static_tokens": bool(torch.equal(tokens["compiled"], tokens["static"])),
            }
            if compile_step
            else {}
        ),
        "repeats": repeats,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--cfg", choices=("both", "on", "off"), default="both")
    parser.add_argument("--span", type=int, default=256, help="tokens per image span (h*w*d)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a small shared CPU)")
    parser.add_argument("--compile", action="store_true", help="also time compiled steps (compile_step=True)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfgs = {"both": (False, True), "on": (True,), "off": (False,)}[args.cfg]
    header = {
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(header), flush=True)
    for shape in args.shapes:
        lm = build_lm(shape, device)
        for batch in args.batches:
            for cfg in cfgs:
                row = run_case(lm, device, batch, cfg, args.span, args.prompt_len, args.repeats, args.compile)
                print(json.dumps({"shape": shape, **row}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
