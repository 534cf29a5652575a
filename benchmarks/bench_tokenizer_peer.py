"""Side by side: the 256 px visual tokenizer against LlamaGen's VQ-16, encode + decode images/s in one run.

Rows (random weights, eval mode, fp32 unless named; batch `--batch` random images in [-1, 1]):

    vq16:            the peer, benchmarks/peers/vq16.py (72M parameters, 16 x 16 codes from 16384 x 8, cosine);
    preset:          configs/tokenizer/llama7b_256.yaml's model (8 x 8 x 4 rq codes over a 32000 x 4096 table,
                     the 7B LLM's size; benchmarks/gpu_kit/visual_tokenizers.py), fp32 code search;
    equal:           the same layout (8 x 8 x 4 codes) with the CNN's channels cut so that its parameters match
                     VQ-16's (`--equal-set`, default model.ch_mult=[1,1,1,2,2,4]: 71.7M vs 71.9M; the GroupNorm's
                     32 groups leave only multiples of 32 for model.ch), fp32 code search;
    equal_bf16:      `equal` with the distance matmul of the code search in bf16 (`search_dtype="bf16"`, fp32
                     accumulation; the code agreement with fp32 is reported by bench_code_search.py);
    preset_bf16:     `preset` with the bf16 search.

The codebook table is not counted as the tokenizer's parameters: it is the LLM's embedding table (UniCode's
premise). One round times every row once (encode, then decode of those codes); `--repeats` rounds after a warm-up
round, in turns, so load on a shared machine hits all rows alike. Reported: the median images/s of each row and,
per row, the median over rounds of (row images/s / vq16 images/s) within the round.

Usage (CPU, 1 thread; about 3 minutes at batch 2):
    python benchmarks/bench_tokenizer_peer.py --threads 1 --batch 2 --repeats 5
On a GPU:
    python benchmarks/bench_tokenizer_peer.py --device cuda --batch 32 --repeats 10
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers.vq16 import VQ16

ROWS = ("vq16", "preset", "equal", "equal_bf16", "preset_bf16")
TABLE_SHAPE = (32000, 4096)  # a 7B LLaMA's embedding table


def _set_search_dtype(module: torch.nn.Module, dtype: str) -> None:
    """Every native quantizer inside `module` searches its codes with `dtype` ("fp32" or "bf16")."""
    found = [m for m in module.modules() if hasattr(m, "search_dtype")]
    if not found:
        raise RuntimeError("no native quantizer found: the preset must use codebook.backend=native")
    for m in found:
        m.search_dtype = dtype


def build_rows(
    names: list[str], equal_set: list[str], device: torch.device, table_shape: tuple[int, int], image_size: int
) -> dict:
    """name -> (encode(images) -> codes, decode(codes) -> images, parameters in millions)."""
    from gpu_kit.visual_tokenizers import build_visual_tokenizer, preset_config

    rows: dict = {}
    if "vq16" in names:
        torch.manual_seed(0)
        peer = VQ16().to(device).eval()
        rows["vq16"] = (peer.encode, peer.decode, peer.parameter_count() / 1e6)
    v, c = table_shape
    table = 0.02 * torch.randn(v, c, generator=torch.Generator().manual_seed(0))  # (V, C), LLaMA's init scale
    for name in names:
        if name == "vq16":
            continue
        overrides = [f"model.image_size={image_size}", *(equal_set if name.startswith("equal") else [])]
        cfg = preset_config("tokenizer/llama7b_256.yaml", overrides)
        torch.manual_seed(0)
        vt = build_visual_tokenizer(cfg, table, range(v)).to(device).eval()
        _set_search_dtype(vt, "bf16" if name.endswith("_bf16") else "fp32")
        own = sum(p.numel() for n, p in vt.named_parameters() if "codebook" not in n and "embedding" not in n)

        def encode(images, vt=vt):
            with torch.no_grad():
                return vt.encode(images)

        def decode(codes, vt=vt):
            with torch.no_grad():
                return vt.decode(codes)

        rows[name] = (encode, decode, own / 1e6)
    return rows


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_round(rows: dict, images: torch.Tensor, device: torch.device) -> dict[str, float]:
    """name -> images/s of one encode + decode of `images`."""
    out = {}
    for name, (encode, decode, _) in rows.items():
        _synchronize(device)
        start = time.perf_counter()
        decode(encode(images))
        _synchronize(device)
        out[name] = images.shape[0] / (time.perf_counter() - start)
    return out


def run(
    names: list[str], batch: int, repeats: int, equal_set: list[str], device: torch.device, table_shape, size: int
) -> dict:
    rows = build_rows(names, equal_set, device, table_shape, size)
    pixels = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    images = (2 * pixels - 1).to(device)
    time_round(rows, images, device)  # warm-up
    rounds = [time_round(rows, images, device) for _ in range(repeats)]
    result = {"parameters_m": {n: round(r[2], 2) for n, r in rows.items()}, "images_per_s": {}, "ratio_to_vq16": {}}
    for name in rows:
        result["images_per_s"][name] = statistics.median(r[name] for r in rounds)
        if "vq16" in rows:
            result["ratio_to_vq16"][name] = statistics.median(r[name] / r["vq16"] for r in rounds)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--equal-set", nargs="+", default=["model.ch_mult=[1,1,1,2,2,4]"], help="the `equal` rows' config overrides"
    )
    p.add_argument("--table", type=int, nargs=2, default=list(TABLE_SHAPE), metavar=("V", "C"))
    p.add_argument("--image-size", type=int, default=256, help="256 (the comparison); smaller only to smoke-test")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = run(args.rows, args.batch, args.repeats, args.equal_set, device, tuple(args.table), args.image_size)
    result["machine"] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": args.batch,
        "image_size": args.image_size,
        "repeats": args.repeats,
    }
    print("| row | parameters (M) | images/s | / vq16 |")
    print("|---|---|---|---|")
    for name, ips in result["images_per_s"].items():
        ratio = result["ratio_to_vq16"].get(name)
        shown = "" if ratio is None else f"{ratio:.2f}"
        print(f"| {name} | {result['parameters_m'][name]:.1f} | {ips:.3f} | {shown} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
