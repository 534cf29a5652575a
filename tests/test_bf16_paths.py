"""The bf16 autocast paths a GPU takes, run on the CPU (autocast works there too): every stage trains finite."""

from __future__ import annotations

import math

import torch

from tests.test_lm import TINY, read_log
from tests.test_mllm_training import make_config
from tests.test_tokenizer_training import tiny_cfg
from unicode_mllm.config import load_config
from unicode_mllm.stages.lm import LMTrainConfig, train_lm
from unicode_mllm.stages.mllm import MLLMTrainer
from unicode_mllm.stages.tokenizer.trainer import TokenizerTrainer


def test_stage0_bf16_run_is_finite_and_saves_fp32_weights(tmp_path):
    cfg = load_config(LMTrainConfig, overrides=[*TINY, "train.mixed_precision=bf16"])
    model_dir = train_lm(cfg, tmp_path / "run")
    losses = [row["train/loss"] for row in read_log(tmp_path / "run")]
    assert losses and all(math.isfinite(x) for x in losses)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(model_dir).dtype == torch.float32


def test_stage1_bf16_step_is_finite_and_keeps_the_codebook_fp32(tiny_lm_dir, tiny_shapes_dir, tmp_path):
    trainer = TokenizerTrainer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path, **{"train.mixed_precision": "bf16"}))
    assert trainer.accelerator.mixed_precision == "bf16"
    logs = [trainer.train_step(trainer.next_batch()) for _ in range(2)]
    assert all(math.isfinite(row["total"]) for row in logs)
    buffers = {n: b.dtype for n, b in trainer.tokenizer.named_buffers() if b.is_floating_point()}
    assert buffers and set(buffers.values()) == {torch.float32}


def test_stage2_bf16_step_is_finite_and_close_to_fp32(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    losses = {}
    for precision in ("no", "bf16"):
        cfg = make_config(
            tiny_lm_dir,
            tiny_visual_tokenizer_dir,
            tiny_shapes_dir,
            tmp_path / precision,
            train={"steps": 1, "mixed_precision": precision},
        )
        trainer = MLLMTrainer(cfg)
        assert trainer.accelerator.mixed_precision == precision
        losses[precision] = trainer.train_step()["loss"]
        assert {p.dtype for p in trainer.mllm.lm.parameters()} == {torch.float32}  # master weights
    assert math.isfinite(losses["bf16"]) and abs(losses["bf16"] - losses["no"]) < 0.05 * losses["no"]


def test_codes_do_not_depend_on_the_callers_autocast(tiny_visual_tokenizer_dir):
    from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

    tokenizer = VisualTokenizer.from_pretrained(tiny_visual_tokenizer_dir).eval()
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    plain = tokenizer.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tokenizer.encode(x), plain)
