"""Every section of the kit, in run order, with its sizes on the GPU and in `--cpu-smoke`: the one place to change them.

`cap_s` is a section's wall-clock cap on the GPU (its process is killed there; what it recorded is kept). The
caps add up to more than the kit's budget (`DEFAULT_BUDGET_MINUTES`): they are worst cases, and the runner
gives each section at most what is left. Expected GPU times (one H100; not measured yet): stages_bf16 ~0.5 min,
small_preset ~5.3 min, quantizer ~0.4, tokenizer_throughput ~0.3, lora_step ~1.5, image_decoding ~0.8:
~8.8 minutes with process starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unicode_mllm.pipeline import PROFILES

DEFAULT_BUDGET_MINUTES = 9.5  # the whole kit on one H100/H200; the task asks for under 10
MIN_SECTION_SECONDS = 20.0  # a section is not started with less than this left (it is recorded as not run)

# A tiny LLaMA vocabulary for the CPU: a text tokenizer of the shapes corpus (~440 ids) plus ~580 code ids.
SMOKE_VOCAB = 1024
# The llama7b_256 tokenizer shrunk for the CPU: 32 px, an 8x8 grid (ch_mult 1,2,2), 2 codes per position.
SMOKE_TOKENIZER = (
    "model.image_size=32",
    "model.ch=8",
    "model.ch_mult=[1, 2, 2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[]",
    "model.z_channels=8",
    "model.depth=2",
)
# unicode_mllm/pipeline.py's smoke profile for the stages in --cpu-smoke (models of width 32, a handful of steps), with
# the kit's few changes after it (later overrides win): a log row every step, 3 stage-2 steps.
_DEMO_SMOKE = PROFILES["smoke"]
SMOKE_LM = (*_DEMO_SMOKE.lm_overrides, "train.log_every=1", "model.num_attention_heads=4")
SMOKE_STAGE1 = (*_DEMO_SMOKE.tokenizer_overrides, "model.ch=8", "optim.warmup_steps=1")
SMOKE_STAGE2 = (
    *_DEMO_SMOKE.mllm_overrides,
    "train.steps=3",
    "train.eval_every=3",
    "train.ckpt_every=3",
    "data.max_tokens_per_forward=4096",
)
SMOKE_EVAL = {
    "tokenizer_images": 8,
    "photos": [],
    "vqa_questions": 6,
    "vqa_per_image": 2,
    "t2i_prompts": 2,
    "batch_size": 8,
    "gallery": 4,
    "max_answer_tokens": 4,
}


@dataclass(frozen=True)
class SectionPlan:
    name: str
    cap_s: float
    gpu: dict[str, Any]
    cpu_smoke: dict[str, Any] = field(default_factory=dict)

    def settings(self, mode: str) -> dict[str, Any]:
        return self.gpu if mode == "gpu" else self.cpu_smoke


PLANS: tuple[SectionPlan, ...] = (
    SectionPlan(
        "stages_bf16",
        cap_s=120,
        # The tiny presets at their own model sizes, a few steps each.
        gpu={
            "presets": {"lm": "lm/tiny.yaml", "tokenizer": "tokenizer/tiny.yaml", "mllm": "mllm/tiny.yaml"},
            "data": {"train": 256, "val": 32, "heldout": 32},
            "lm_overrides": [
                "train.steps=30",
                "optim.warmup_steps=3",
                "train.log_every=1",
                "train.eval_every=30",
                "train.ckpt_every=30",
                "corpus.train_samples=200",
                "corpus.val_samples=20",
            ],
            "tokenizer_overrides": [
                "train.steps=20",
                "codebook.blend.ramp_steps=10",
                "optim.warmup_steps=2",
                "train.log_every=1",
                "train.eval_every=20",
                "train.ckpt_every=20",
                "train.eval_batches=1",
            ],
            "mllm_overrides": [
                "train.steps=20",
                "train.log_every=1",
                "train.eval_every=20",
                "train.ckpt_every=20",
                "eval.records=8",
                "eval.batch_size=16",
            ],
        },
        cpu_smoke={
            "presets": {"lm": "lm/tiny.yaml", "tokenizer": "tokenizer/tiny.yaml", "mllm": "mllm/tiny.yaml"},
            "data": {"train": 32, "val": 16, "heldout": 16},
            "lm_overrides": list(SMOKE_LM),
            "tokenizer_overrides": list(SMOKE_STAGE1),
            "mllm_overrides": list(SMOKE_STAGE2),
        },
    ),
    SectionPlan(
        "small_preset",
        cap_s=360,
        gpu={
            "presets": {"lm": "lm/small.yaml", "tokenizer": "tokenizer/small.yaml", "mllm": "mllm/small.yaml"},
            "data": {"train": 5000, "val": 200, "heldout": 200, "analyser_count": 100},
            "lm_overrides": [],
            "tokenizer_overrides": [],
            "mllm_overrides": [],
            "evaluation": {
                "tokenizer_images": 100,
                "photos": [],
                "vqa_questions": 300,
                "vqa_per_image": 3,
                "t2i_prompts": 50,
                "batch_size": 50,
                "gallery": 16,
                "max_answer_tokens": 16,
            },
            "sampling": {"temperature": 1.0, "top_k": 50, "cfg_scale": 3.0, "seed": 0},
            "total_minutes": 5.25,  # data + stage 0 ~0.75, stage 1 cap 1.25, stage 2 cap 2.5, evaluation 0.75
            "eval_reserve_minutes": 0.75,
            "targets": {"heldout_vqa": 0.90, "t2i_whole_scene_seen": 0.60},
        },
        cpu_smoke={
            "presets": {"lm": "lm/small.yaml", "tokenizer": "tokenizer/small.yaml", "mllm": "mllm/small.yaml"},
            "data": {"train": 32, "val": 16, "heldout": 16, "analyser_count": 5},
            "lm_overrides": list(SMOKE_LM),
            "tokenizer_overrides": list(SMOKE_STAGE1),
            "mllm_overrides": list(SMOKE_STAGE2),
            "evaluation": SMOKE_EVAL,
            "sampling": {"temperature": 1.0, "top_k": 50, "cfg_scale": 3.0, "seed": 0},
            "total_minutes": 10.0,
            "eval_reserve_minutes": 1.0,
            "targets": {"heldout_vqa": 0.90, "t2i_whole_scene_seen": 0.60},
        },
    ),
    SectionPlan(
        "quantizer",
        cap_s=90,
        # The quantizer's cost at LLM scale (native_quantizer.py): 8192 tokens into a 32000 x 4096 codebook, 4 layers.
        gpu={"tokens": 8192, "size": "32000x4096", "depth": 4, "in_channels": 64, "warmup": 3, "repeats": 10},
        cpu_smoke={"tokens": 64, "size": "512x64", "depth": 4, "in_channels": 64, "warmup": 1, "repeats": 3},
    ),
    SectionPlan(
        "tokenizer_throughput",
        cap_s=60,
        gpu={
            "preset": "tokenizer/llama7b_256.yaml",
            "overrides": [],
            "codebook": [32000, 4096],
            "batch": 32,
            "warmup": 2,
            "repeats": 5,
        },
        cpu_smoke={
            "preset": "tokenizer/llama7b_256.yaml",
            "overrides": list(SMOKE_TOKENIZER),
            "codebook": [256, 32],
            "batch": 2,
            "warmup": 1,
            "repeats": 2,
        },
    ),
    SectionPlan(
        "lora_step",
        cap_s=180,
        # configs/mllm/vicuna7b_lora.yaml per GPU: 16 records of up to 1,024 tokens; smaller batches, then
        # smaller shapes, when it does not fit.
        gpu={
            "shapes": ["7b", "3b", "1b"],
            "batch": 16,
            "seq_len": 1024,
            "checkpointing": [True, False],
            "compute_dtype": "bf16",
            "warmup": 2,
            "steps": 3,
            "min_seconds_to_try": 25,
        },
        cpu_smoke={
            "shapes": ["tiny"],
            "batch": 2,
            "seq_len": 32,
            "checkpointing": [True, False],
            "compute_dtype": "bf16",  # CPU autocast: the GPU's dtypes (bf16 base, fp32 adapters) at toy size
            "warmup": 1,
            "steps": 2,
            "min_seconds_to_try": 0,
        },
    ),
    SectionPlan(
        "image_decoding",
        cap_s=120,
        # A 7B LLaMA in bf16 writing the llama7b_256 tokenizer's 8x8x4 = 256 codes per image.
        gpu={
            "shape": "7b",
            "dtype": "bf16",
            "vocab_size": 32000,
            "tokenizer_preset": "tokenizer/llama7b_256.yaml",
            "tokenizer_overrides": [],
            "runs": [
                {"images": 1, "batch_size": 1, "cfg_scale": 1.0},
                {"images": 8, "batch_size": 8, "cfg_scale": 3.0},
            ],
            "temperature": 1.0,
            "top_k": 50,
            "seed": 0,
        },
        cpu_smoke={
            "shape": "tiny",
            "dtype": "bf16",  # the GPU's dtype, at toy size
            "vocab_size": SMOKE_VOCAB,
            "tokenizer_preset": "tokenizer/llama7b_256.yaml",
            "tokenizer_overrides": list(SMOKE_TOKENIZER),
            "runs": [
                {"images": 1, "batch_size": 1, "cfg_scale": 1.0},
                {"images": 2, "batch_size": 2, "cfg_scale": 3.0},
            ],
            "temperature": 1.0,
            "top_k": 50,
            "seed": 0,
        },
    ),
)

SECTION_NAMES = tuple(plan.name for plan in PLANS)


def get_plan(name: str) -> SectionPlan:
    for plan in PLANS:
        if plan.name == name:
            return plan
    raise KeyError(f"section {name!r} is unknown; choose from {', '.join(SECTION_NAMES)}")
