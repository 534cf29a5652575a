"""Section image_decoding: image-span decoding tokens/s at a 7B shape against the memory-bandwidth bound."""

from __future__ import annotations

import time

import torch

from gpu_kit.context import SectionContext, peak_memory_gib, reset_peak_memory
from gpu_kit.flops import kv_cache_bytes_per_position

TITLE = "image-span decoding at a 7B LLaMA shape (text-to-image code writing)"
HOW = (
    "A UniCodeMLLM of a LLaMA of the named shape (random weights, in the recorded dtype), the stage-0 BPE text "
    "tokenizer of the shapes corpus and a visual tokenizer of configs/tokenizer/llama7b_256.yaml's shape whose "
    "codes are the LM's ids after the text vocabulary (its codebook: those rows of the LM's embedding table). "
    "Timed: generation.generate_images(model, decode=False), i.e. generation/image_generation.py's "
    "generate_image_sequences: prefill, then one KV-cached forward per code with the span constraint and "
    "top-k sampling, h*w*d codes per image (no pixel decoding). tokens/s = images * h*w*d / wall time of the call "
    "(after one warm-up call). Bound: each forward reads every weight once (the input embedding is a gather and "
    "is excluded): weights_bound = images per batch * HBM bandwidth / weight bytes; with_kv_bound adds the KV "
    "cache each forward reads, rows * 2 * L * kv_width * bytes * (prompt length + h*w*d / 2), rows = images "
    "(x2 with classifier-free guidance), the prompt length the longest of the left-padded batch. Both are upper "
    "bounds (HF's eager decoding also pays kernel launches)."
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_model(ctx: SectionContext):
    """(UniCodeMLLM, LLaMA shape dict) at the settings' shape, on the device, in eval mode."""
    import bench_stage2_step as bench
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpu_kit.visual_tokenizers import build_visual_tokenizer, preset_config
    from unicode_mllm.model import UniCodeMLLM
    from unicode_mllm.stages.lm import CorpusConfig, TextTokenizerConfig, build_corpus, train_text_tokenizer

    s = ctx.settings
    text_tokenizer = train_text_tokenizer(build_corpus(CorpusConfig(train_samples=200), "train"), TextTokenizerConfig())
    shape = {**bench.SHAPES[s["shape"]], "vocab_size": s["vocab_size"]}
    config = LlamaConfig(
        **shape,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=text_tokenizer.bos_token_id,
        eos_token_id=text_tokenizer.eos_token_id,
        pad_token_id=text_tokenizer.pad_token_id,
    )
    dtype = DTYPES[s["dtype"]]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights in the decoding dtype directly (no fp32 copy of 7B)
    try:
        with ctx.device:
            lm = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    code_ids = range(len(text_tokenizer), shape["vocab_size"])  # every id after the text vocabulary is a code
    # The codebook: those rows of the (V, h) input embedding table, as stage 1's language-driven codebook.
    cfg = preset_config(s["tokenizer_preset"], s["tokenizer_overrides"])
    vt = build_visual_tokenizer(cfg, lm.get_input_embeddings().weight, code_ids).to(ctx.device)
    model = UniCodeMLLM(lm, vt, text_tokenizer, reading="aggregated", template="plain").eval()
    return model, shape


def run(ctx: SectionContext) -> None:
    from gpu_kit.chips import chip_spec, device_name
    from unicode_mllm.data.shapes import ShapesConfig
    from unicode_mllm.evaluation import shapes_t2i_prompts
    from unicode_mllm.generation.image_generation import generate_images, unconditional_prompt
    from unicode_mllm.generation.prompts import prompt_builder, prompt_sample

    s = ctx.settings
    model, shape = build_model(ctx)
    lm = model.lm
    elem = lm.get_input_embeddings().weight.element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    weight_bytes -= lm.get_input_embeddings().weight.numel() * elem  # a gather reads b rows, not the table
    span = model.num_write_tokens
    ctx.setting(
        parameters=sum(p.numel() for p in lm.parameters()),
        weight_bytes_per_forward=weight_bytes,
        code_shape=list(model.code_shape),
        codes_per_image=span,
        text_vocabulary=len(model.text_tokenizer),
    )
    spec = chip_spec(device_name(ctx.device))  # None for a CPU or an unknown card
    if spec is None:
        ctx.note("no datasheet bandwidth for this device: the bound is not computed")
    most = max(r["images"] for r in s["runs"])
    prompts = [p.prompt for p in shapes_t2i_prompts(ShapesConfig(), most)][:most]
    builder = prompt_builder(model)
    lengths = [len(prompt_sample(builder, builder.text_to_image_prompt(p))) for p in prompts]  # tokens, to <img>
    uncond_length = len(unconditional_prompt(model))

    def generate(n: int, batch_size: int, cfg_scale: float) -> float:
        start = time.perf_counter()
        generate_images(
            model,
            prompts[:n],
            temperature=s["temperature"],
            top_k=s["top_k"],
            cfg_scale=cfg_scale,
            seed=s["seed"],
            batch_size=batch_size,
            decode=False,
        )  # returns CPU tensors: the device is synchronised
        return time.perf_counter() - start

    with torch.inference_mode():
        generate(1, 1, 1.0)  # warm-up: kernels, allocator, the constraint's tables
        for r in s["runs"]:
            if ctx.seconds_left() < 10:
                ctx.note(f"run {r} not timed: {ctx.seconds_left():.0f} s left")
                continue
            reset_peak_memory(ctx.device)
            seconds = generate(r["images"], r["batch_size"], r["cfg_scale"])
            where = {
                **r,
                "dtype": s["dtype"],
                "shape": s["shape"],
                "temperature": s["temperature"],
                "top_k": s["top_k"],
            }
            tag = f"b{r['batch_size']}_cfg{r['cfg_scale']:g}"
            tokens_per_s = r["images"] * span / seconds
            ctx.figure(f"{tag}_tokens_per_s", tokens_per_s, "codes/s", seconds=round(seconds, 3), **where)
            ctx.figure(f"{tag}_ms_per_forward", 1e3 * seconds / span, "ms", **where)
            peak = peak_memory_gib(ctx.device)
            if peak is not None:
                ctx.figure(f"{tag}_peak_memory", peak, "GiB", **where)
            if spec is None:
                continue
            guided = r["cfg_scale"] != 1.0
            rows = r["batch_size"] * (2 if guided else 1)
            # Left-padded batches: every row's cache is as long as the batch's longest prompt.
            prompt = max(lengths[: r["images"]] + ([uncond_length] if guided else []))
            kv = rows * kv_cache_bytes_per_position(shape, elem) * (prompt + span / 2)
            bandwidth = spec.hbm_tb_per_s * 1e12
            weights_bound = r["batch_size"] * bandwidth / weight_bytes
            kv_bound = r["batch_size"] * bandwidth / (weight_bytes + kv)
            ctx.figure(f"{tag}_weights_bound", weights_bound, "codes/s", hbm_tb_per_s=spec.hbm_tb_per_s, **where)
            ctx.figure(f"{tag}_with_kv_bound", kv_bound, "codes/s", mean_kv_bytes=round(kv), **where)
            ctx.figure(f"{tag}_fraction_of_bound", 100 * tokens_per_s / kv_bound, "% of with_kv_bound", **where)
