"""Stage-2 training step of the LM at a preset's shape: time per step, tokens per second, peak memory.

What one step is: the forward and backward of a LLaMA causal LM over (batch, seq_len) tokens with the
next-token loss on every position, then an AdamW step over the trainable parameters; bf16 autocast on a
GPU with native bf16 (fp32 elsewhere). The weights' dtypes are train-mllm's (`frozen_weights_dtype` and
`build_model` in unicode_mllm/stages/mllm/trainer.py): full fine-tuning keeps fp32 master weights; with `--lora`
under bf16 the frozen base is stored in bf16 and the project's adapters (`LoraSettings`: r 128, alpha 256,
dropout 0.05, every linear layer) and, as the 7B preset, the trainable embedding table train in fp32. The image
splice of `UniCodeMLLM` is not in the step: it is one gather and one scatter per image, next to 32 transformer
layers.

The weights are random (a `LlamaConfig` of the named shape, built directly on the device): no download,
and the step costs what a pretrained model's costs. Shapes:
    tiny: the CPU preset's stage-0 LM (width 128, 4 layers, vocabulary 442);
    7b:   LLaMA-2-7B / Vicuna-7B-v1.5 (width 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000);
    3b, 1b: smaller LLaMA shapes (OpenLLaMA-3B's; TinyLlama-1.1B's without its grouped KV heads), the fallbacks
          of benchmarks/gpu_suite.py when 7B does not fit a card.

Reported: the median and min wall time of a step after warm-up, tokens per second at the median, and the
peak memory of the step: on CUDA torch.cuda.max_memory_allocated() (weights, optimizer state and
activations: the number that decides whether the preset fits), on CPU the peak RSS of the process.

`--compare-packing CONFIG` measures instead the real stage-2 step of a preset (`MLLMTrainer.train_step`: sample
building, image splice, forward, backward, AdamW) with `data.packing` off and on: two trainers of the same seed
(so the same samples every step), their steps interleaved in one process so that a shared machine's load hits
both alike. Stages 0 and 1 are stand-ins trained for one step (`--work` keeps them): the step's cost does not
depend on trained weights, and sample lengths only on the text tokenizer (trained in full by stage 0) and the code
shape. Reported per mode: real (unpadded) and padded tokens summed over the timed steps, padded/real, forward
passes, median step time and real tokens/s; then the ratios packed/unpacked.

Usage:
    python benchmarks/bench_stage2_step.py --size tiny --batch 8 --seq-len 640 --threads 1     # CPU preset
    python benchmarks/bench_stage2_step.py --compare-packing configs/mllm/tiny.yaml --threads 2 \
        --warmup 2 --steps 20                                                                  # packing on/off
    python benchmarks/bench_stage2_step.py --size 7b --lora --activation-checkpointing \\
        --batch 16 --seq-len 1024 --device cuda                                                 # 7B preset, per GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unicode_mllm.model.mllm import LoraSettings
from unicode_mllm.runtime.devices import select_device, select_dtype
from unicode_mllm.stages.mllm.trainer import enable_activation_checkpointing

SHAPES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384, vocab_size=442),
    "7b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008, vocab_size=32000
    ),
    "3b": dict(
        hidden_size=3200, num_hidden_layers=26, num_attention_heads=32, intermediate_size=8640, vocab_size=32000
    ),
    "1b": dict(
        hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, intermediate_size=5632, vocab_size=32000
    ),
}


def frozen_dtype(lora: bool, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype the LM is built in: bf16 for a LoRA base under bf16 autocast, else fp32 (train-mllm's rule)."""
    return torch.bfloat16 if lora and compute_dtype == torch.bfloat16 else torch.float32


def build_lm(
    size: str,
    seq_len: int,
    device: torch.device,
    lora: bool,
    checkpointing: bool,
    base_dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A random LLaMA of shape `size` on `device`, its weights in `base_dtype` (built so: no fp32 copy of a 7B
    LM first); with `lora`, the adapters and the embedding table trainable and in fp32."""
    config = LlamaConfig(**SHAPES[size], max_position_embeddings=max(seq_len, 2048), tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(base_dtype)
    try:
        with device:
            lm = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if checkpointing:
        lm.config.use_cache = False
        enable_activation_checkpointing(lm)  # as train-mllm with train.gradient_checkpointing
    if lora:
        from peft import get_peft_model

        lm = get_peft_model(lm, LoraSettings().to_peft())
        lm.get_input_embeddings().weight.requires_grad_(True)  # the 7B preset's train_embeddings: true
        for parameter in lm.parameters():
            if parameter.requires_grad:  # adapters and embeddings train in fp32 over a bf16 base
                parameter.data = parameter.data.float()
    return lm


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def time_steps(
    lm: torch.nn.Module, batch: int, seq_len: int, dtype: torch.dtype, warmup: int, steps: int
) -> list[float]:
    """Wall times (s) of `steps` training steps of `lm` over random (batch, seq_len) ids, after `warmup` untimed ones.

    A fresh AdamW over the trainable parameters each call, so that a caller can retry a smaller batch after
    torch.OutOfMemoryError on the same model (its gradients are dropped with `zero_grad(set_to_none=True)`).
    """
    device = next(lm.parameters()).device
    trainable = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, fused=device.type == "cuda")
    vocab = lm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq_len), device=device)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    return [step() for _ in range(steps)]


def run(args: argparse.Namespace) -> dict:
    device = select_device(args.device)
    dtype = select_dtype("auto", device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_dtype = frozen_dtype(args.lora, dtype)
    lm = build_lm(args.size, args.seq_len, device, args.lora, args.activation_checkpointing, base_dtype)
    trainable = [p for p in lm.parameters() if p.requires_grad]
    times = time_steps(lm, args.batch, args.seq_len, dtype, args.warmup, args.steps)
    median = statistics.median(times)
    return {
        "size": args.size,
        "lora": args.lora,
        "activation_checkpointing": args.activation_checkpointing,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "compute_dtype": str(dtype).removeprefix("torch."),
        "base_dtype": str(base_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "parameters_m": round(sum(p.numel() for p in lm.parameters()) / 1e6, 2),
        "trainable_m": round(sum(p.numel() for p in trainable) / 1e6, 2),
        "median_step_s": round(median, 4),
        "min_step_s": round(min(times), 4),
        "tokens_per_s": round(args.batch * args.seq_len / median, 1),
        "peak_memory_mib": round(peak_memory_mib(device), 1),
        "steps_timed": len(times),
        "torch": torch.__version__,
    }


def build_stand_ins(work: Path) -> tuple[Path, Path, Path]:
    """Shapes shards and one-step stage-0/stage-1 runs of the tiny presets under `work` (reused when there):
    (shards, LM folder, visual tokenizer folder)."""
    from unicode_mllm.config import load_config
    from unicode_mllm.data.shapes import ShapesConfig
    from unicode_mllm.data.shapes_dataset import write_shapes_dataset
    from unicode_mllm.stages.lm import LMTrainConfig, train_lm
    from unicode_mllm.stages.tokenizer.config import TokenizerTrainConfig
    from unicode_mllm.stages.tokenizer.trainer import train_tokenizer

    shards, lm_dir, vt_dir = work / "shapes32", work / "lm" / "model", work / "tokenizer" / "final"
    if not (shards / "manifest.json").is_file():
        write_shapes_dataset(ShapesConfig(image_size=32), shards, {"train": 512, "val": 16, "heldout": 16})
    if not lm_dir.is_dir():
        steps = [
            "train.steps=1",
            "optim.warmup_steps=0",
            "train.eval_every=1",
            "train.ckpt_every=1",
            "train.device=cpu",
        ]
        lm_dir = Path(train_lm(load_config(LMTrainConfig, "configs/lm/tiny.yaml", steps), out_dir=work / "lm"))
    if not vt_dir.is_dir():
        overrides = [f"codebook.llm={lm_dir}", f"data.shards={shards}", "train.steps=1", "optim.warmup_steps=0"]
        overrides += ["train.eval_every=1", "train.ckpt_every=1", "train.device=cpu", "codebook.blend.ramp_steps=1"]
        cfg = load_config(TokenizerTrainConfig, "configs/tokenizer/tiny.yaml", overrides)
        vt_dir = Path(train_tokenizer(cfg, out_dir=work / "tokenizer").final_dir)
    return shards, lm_dir, vt_dir


def compare_packing(args: argparse.Namespace) -> dict:
    """Interleaved `train_step`s of the preset `args.compare_packing` with data.packing off and on."""
    from unicode_mllm.config import load_config
    from unicode_mllm.stages.mllm import MLLMTrainConfig, MLLMTrainer

    work = Path(args.work)
    shards, lm_dir, vt_dir = build_stand_ins(work)
    trainers = {}
    for packing in (False, True):
        overrides = [f"model.lm={lm_dir}", f"model.visual_tokenizer={vt_dir}", f"data.shards={shards}"]
        overrides += [f"data.packing={str(packing).lower()}", "train.device=cpu", f"train.out_dir={work}/mllm"]
        cfg = load_config(MLLMTrainConfig, args.compare_packing, overrides)
        trainers[packing] = MLLMTrainer(cfg, out_dir=work / f"mllm_packing_{packing}")
    if args.threads:
        torch.set_num_threads(args.threads)  # the trainers set train.num_threads when the config has one
    rows: dict[bool, list[dict]] = {False: [], True: []}
    for step in range(args.warmup + args.steps):
        for packing in (False, True) if step % 2 == 0 else (True, False):  # alternate who goes first
            start = time.perf_counter()
            logs = trainers[packing].train_step()
            logs["wall_s"] = time.perf_counter() - start
            if step >= args.warmup:
                rows[packing].append(logs)
    out: dict = {"config": args.compare_packing, "threads": torch.get_num_threads(), "steps_timed": args.steps}
    for packing, logs in rows.items():
        real, padded = sum(r["tokens"] for r in logs), sum(r["padded_tokens"] for r in logs)
        median = statistics.median(r["wall_s"] for r in logs)
        out["packed" if packing else "unpacked"] = {
            "packing_used": trainers[packing].packing(),
            "real_tokens": real,
            "padded_tokens": padded,
            "padded_per_real": round(padded / real, 4),
            "forward_passes": sum(r["forward_passes"] for r in logs),
            "median_step_s": round(median, 4),
            "real_tokens_per_s": round(real / sum(r["wall_s"] for r in logs), 1),
            "loss_last": round(logs[-1]["loss"], 5),
        }
    u, p = out["unpacked"], out["packed"]
    out["ratio_real_tokens_per_s"] = round(p["real_tokens_per_s"] / u["real_tokens_per_s"], 3)
    out["ratio_median_step_s"] = round(p["median_step_s"] / u["median_step_s"], 3)
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    out["cpu"] = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=640)
    parser.add_argument("--lora", action="store_true", help="the project's LoRA adapters + trainable embeddings")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--compare-packing", metavar="CONFIG", help="a stage-2 preset: its real step, packing off/on")
    parser.add_argument("--work", default="runs/bench_packing", help="--compare-packing's stand-in stage 0/1 runs")
    args = parser.parse_args(argv)
    if args.compare_packing:
        print(json.dumps(compare_packing(args)))
        return 0
    for name in ("batch", "seq_len", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        row = run(args)
    except torch.OutOfMemoryError as error:  # a size that does not fit is a result too
        print(json.dumps({"size": args.size, "batch": args.batch, "seq_len": args.seq_len, "oom": str(error)[:200]}))
        return 1
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
