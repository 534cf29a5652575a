"""Section small_preset: the `small` presets end to end through `run_demo`, with held-out VQA and text-to-image."""

from __future__ import annotations

import json

from gpu_kit.context import SectionContext
from gpu_kit.sections.stages_bf16 import record_stage

TITLE = "the small preset end to end (64 px shapes -> stage 0 -> stage 1 -> stage 2 -> evaluation)"
HOW = (
    "unicode_mllm/demo.py's run_demo with a profile of the kit's own (plan.py) over configs/lm/small.yaml, "
    "configs/tokenizer/small.yaml and configs/mllm/small.yaml: shapes shards at the tokenizer's image size, stage "
    "0, stage 1 on that LM's embedding table, stage 2, then the demo's evaluation: held-out VQA exact match with "
    "greedy decoding (generation.answer) and text-to-image of seen and held-out colour+shape pairs (temperature, "
    "top-k and CFG as recorded) read back by the shapes analyser; 'whole scene' = every object right in shape, "
    "colour and position, and the count. The profile's total_minutes is a wall-clock budget (the demo's "
    "TimeBudget lowers stage 1 and 2's train.max_minutes to fit it). steps/s as in stages_bf16, from each "
    "stage's log rows."
)


def run(ctx: SectionContext) -> None:
    from unicode_mllm.demo import run_demo
    from unicode_mllm.pipeline import DataSizes, DemoProfile, EvalSizes, Sampling, StagePresets

    s = ctx.settings
    # The budget is the plan's, or what is left of the section's time (minus ~15 s to start and stop).
    minutes = min(s["total_minutes"], (ctx.seconds_left() - 15) / 60)
    ev = dict(s["evaluation"], photos=tuple(s["evaluation"]["photos"]))
    profile = DemoProfile(
        data=DataSizes(**s["data"]),
        lm_overrides=tuple(s["lm_overrides"]),
        tokenizer_overrides=tuple(s["tokenizer_overrides"]),
        mllm_overrides=tuple(s["mllm_overrides"]),
        evaluation=EvalSizes(**ev),
        sampling=Sampling(**s["sampling"]),
        total_minutes=round(minutes, 2),
        eval_reserve_minutes=s["eval_reserve_minutes"],
        presets=StagePresets(**s["presets"]),
    )
    record_sizes(ctx, profile)
    demo_dir = ctx.out_dir / "demo"
    metrics = run_demo(demo_dir, profile=profile, profile_name="small")

    lm_metrics = json.loads((demo_dir / "lm" / "metrics.json").read_text())
    ctx.figure("lm_parameters", lm_metrics["num_parameters"], "parameters")
    stages = metrics["stages"]
    lm_steps = lm_metrics["steps"]
    for stage, key, steps in (
        ("stage0", "lm", lm_steps),
        ("stage1", "tokenizer", stages["tokenizer"]["step"]),
        ("stage2", "mllm", stages["mllm"]["step"]),
    ):
        record_stage(ctx, stage, demo_dir / key, steps=steps)
        ctx.figure(f"{stage}_seconds", stages[key]["seconds"], "s")
    heldout = metrics["eval"]["tokenizer"].get("heldout", {})
    if heldout.get("available"):
        ctx.figure("stage1_heldout_psnr", heldout["psnr"], "dB", images=heldout["num_images"])
        if heldout.get("scene_fidelity"):
            ctx.figure("stage1_heldout_scene_kept", 100 * heldout["scene_fidelity"]["overall"], "% of images")

    targets = s["targets"]
    vqa = metrics["eval"]["vqa"]
    ctx.figure(
        "heldout_vqa_greedy",
        100 * vqa["accuracy"],
        "% exact match",
        questions=vqa["num_questions"],
        target_pct=100 * targets["heldout_vqa"],
    )
    groups = metrics["eval"]["t2i"]["groups"]
    for group in ("seen", "heldout"):
        if group in groups:
            extra = {"target_pct": 100 * targets["t2i_whole_scene_seen"]} if group == "seen" else {}
            g = groups[group]
            ctx.figure(f"t2i_whole_scene_{group}", 100 * g["overall"], "% of images", prompts=g["num_prompts"], **extra)
    ctx.figure("seconds_by_demo_clock", metrics["seconds"], "s")
    met = {
        "held-out VQA": vqa["accuracy"] >= targets["heldout_vqa"],
        "T2I whole scene (seen)": groups.get("seen", {}).get("overall", 0.0) >= targets["t2i_whole_scene_seen"],
    }
    ctx.note(
        "targets on the GPU (reported, not asserted): "
        + "; ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in met.items())
        + f"; the demo report is {demo_dir / 'report'}"
    )


def record_sizes(ctx: SectionContext, profile) -> None:
    """The resolved sizes of the three stages (the presets with the profile's overrides)."""
    from unicode_mllm.pipeline import load_stage_configs

    lm, tok, mllm = load_stage_configs(profile)
    ctx.setting(
        total_minutes=profile.total_minutes,
        lm={
            "hidden_size": lm.model.hidden_size,
            "layers": lm.model.num_hidden_layers,
            "heads": lm.model.num_attention_heads,
            "intermediate_size": lm.model.intermediate_size,
            "steps": lm.train.steps,
            "batch_size": lm.train.batch_size,
            "seq_len": lm.train.seq_len,
        },
        tokenizer={
            "image_size": tok.model.image_size,
            "ch": tok.model.ch,
            "ch_mult": list(tok.model.ch_mult),
            "stacking": tok.model.stacking,
            "depth": tok.model.depth,
            "steps": tok.train.steps,
            "batch_size": tok.data.batch_size,
            "max_minutes": tok.train.max_minutes,
        },
        mllm={
            "steps": mllm.train.steps,
            "records_per_batch": mllm.data.records_per_batch,
            "max_length": mllm.data.max_length,
            "lr": mllm.optim.lr,
            "max_minutes": mllm.train.max_minutes,
        },
    )
