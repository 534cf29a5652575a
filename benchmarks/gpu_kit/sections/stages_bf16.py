"""Section stages_bf16: a few bf16 steps of each trainer, through the demo's stage functions."""

from __future__ import annotations

import math

from gpu_kit.context import SectionContext
from gpu_kit.run_logs import stage_progress

TITLE = "bf16 smoke of the three training stages"
HOW = (
    "Shapes shards, then stage 0 (`unicode_mllm.stages.lm.pretrain.train_lm`), stage 1 "
    "(`unicode_mllm.stages.tokenizer.trainer.train_tokenizer`, codebook = that LM's embedding table) and stage 2 "
    "(`unicode_mllm.stages.mllm.trainer.train_mllm`) through unicode_mllm/pipeline.py's train_stage0/1/2, with "
    "train.device set to the kit's device and train.mixed_precision=bf16. steps/s = (last timed step - first "
    "timed step) / (their time difference) over per-step log rows: the first logged step (warm-up, CUDA "
    "initialisation) is excluded, and so are evaluations (stage 0 skips rows holding val/loss; stage 2 times its "
    "optimizer steps only); the logs round times to 1 ms (stage 0) and 10 ms (stages 1 and 2), so a few-step "
    "smoke's steps/s is coarse. Final loss = the last logged training loss; the section fails when one is not "
    "finite."
)

UNITS = {
    "stage0": "nats/token (next-token loss)",
    "stage1": "pixel L2 + commitment loss",
    "stage2": "task-weighted nats/token",
}


def run(ctx: SectionContext) -> None:
    from unicode_mllm.pipeline import (
        PROFILES,
        DataSizes,
        DemoProfile,
        StagePresets,
        load_stage_configs,
        train_stage0,
        train_stage1,
        train_stage2,
        write_demo_data,
    )

    s = ctx.settings
    device = [f"train.device={ctx.device.type}", "train.mixed_precision=bf16"]
    ctx.setting(device_overrides=device)
    profile = DemoProfile(
        data=DataSizes(analyser_count=0, **s["data"]),
        lm_overrides=(*s["lm_overrides"], *device),
        tokenizer_overrides=(*s["tokenizer_overrides"], *device),
        mllm_overrides=(*s["mllm_overrides"], *device),
        evaluation=PROFILES["smoke"].evaluation,  # not used: no evaluation here
        presets=StagePresets(**s["presets"]),
    )
    lm_cfg, tok_cfg, mllm_cfg = load_stage_configs(profile)
    data_dir = ctx.out_dir / "data"
    write_demo_data(profile.data, tok_cfg.model.image_size, data_dir)

    lm_dir, _ = train_stage0(lm_cfg, ctx.out_dir / "lm")
    record_stage(ctx, "stage0", ctx.out_dir / "lm", tokens_per_step=lm_cfg.train.batch_size * lm_cfg.train.seq_len)
    tok = train_stage1(tok_cfg, lm_dir, data_dir, ctx.out_dir / "tokenizer", max_minutes=None)
    record_stage(ctx, "stage1", ctx.out_dir / "tokenizer")
    train_stage2(mllm_cfg, lm_dir, tok.final_dir, data_dir, ctx.out_dir / "mllm", max_minutes=None)
    record_stage(ctx, "stage2", ctx.out_dir / "mllm")
    bad = [f["name"] for f in ctx.record["figures"] if f["name"].endswith("final_loss") and isinstance(f["value"], str)]
    if bad:
        raise RuntimeError(f"non-finite final loss: {', '.join(bad)}")


def record_stage(
    ctx: SectionContext, stage: str, run_dir, tokens_per_step: int | None = None, steps: int | None = None
) -> None:
    """The stage's steps (`steps`, else the last logged one), steps/s (and tokens/s where a step's tokens are
    fixed) and final loss as figures."""
    p = stage_progress(stage, run_dir)
    ctx.figure(f"{stage}_steps", p.steps if steps is None else steps, "steps")
    ctx.figure(f"{stage}_steps_per_s", p.steps_per_s, "steps/s", timed_steps=p.timed_steps)
    if tokens_per_step is not None:
        ctx.figure(
            f"{stage}_tokens_per_s", p.steps_per_s * tokens_per_step, "tokens/s", tokens_per_step=tokens_per_step
        )
    ctx.figure(f"{stage}_final_loss", p.final_loss, UNITS[stage])
    if not math.isfinite(p.final_loss):
        ctx.note(f"{stage}: final loss {p.final_loss} is not finite")
