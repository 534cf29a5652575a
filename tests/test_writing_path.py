"""The writing path against its training target: the cached greedy decoder agrees with a full forward, and a
model that memorised images redraws them code for code (the memorisation check of RESULTS.md, at test scale)."""

from __future__ import annotations

import pytest
import torch

from unicode_mllm.data.image_io import pil_to_tensor
from unicode_mllm.data.shapes import ShapesConfig, ShapesWorld
from unicode_mllm.data.shapes_dataset import write_shapes_dataset
from unicode_mllm.evaluation.writing_path import measure_writing_path
from unicode_mllm.generation.image_generation import generate_images
from unicode_mllm.model import UniCodeMLLM
from unicode_mllm.stages.mllm import MLLMTrainer

from .test_mllm_training import make_config

# transformers deprecations (e.g. the KV-cache argument `past_key_values` -> `cache`, removed in 5.40) must
# fail here, not surface in users' terminals.
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


def test_cached_greedy_decoding_agrees_with_a_full_forward(tiny_mllm_dir):
    """A random model: whatever it writes, the cached decoder's every choice is the full forward's argmax over the
    same prefix (a mismatch of prompt layout, positions or cache would break this)."""
    model = UniCodeMLLM.from_pretrained(tiny_mllm_dir).eval()
    target = model.visual_tokenizer.codes_to_token_ids(torch.zeros(1, *model.code_shape, dtype=torch.long))[0]
    path = measure_writing_path(model, "Draw a red circle at the top left.", target)
    assert path.cached_vs_full_forward_agreement == 1.0
    assert len(path.greedy) == model.num_write_tokens


def test_left_padded_batches_write_what_single_prompts_write(tiny_mllm_dir):
    model = UniCodeMLLM.from_pretrained(tiny_mllm_dir).eval()
    prompts = ["Draw a red circle.", "Draw a small blue square at the bottom right on a gray background."]
    together = generate_images(model, prompts, temperature=0.0, decode=False, batch_size=2).sequences
    alone = [generate_images(model, p, temperature=0.0, decode=False).sequences[0] for p in prompts]
    assert all(torch.equal(together[i], alone[i]) for i in range(2))


def test_a_model_that_memorised_two_images_redraws_them_exactly(tiny_lm_dir, tiny_visual_tokenizer_dir, tmp_path):
    """Stage 2 on two shapes images, text-to-image only: once teacher forcing writes every code right, greedy
    decoding writes the whole image right, code for code (no drift without an error to drift from)."""
    shapes = ShapesConfig(image_size=32)
    write_shapes_dataset(shapes, tmp_path / "data", {"train": 2}, shard_size=2, grid_samples=2)
    tasks = {"vqa": 0.0, "caption": 0.0, "text_to_image": 1.0, "decompression": 0.0}
    cfg = make_config(
        tiny_lm_dir,
        tiny_visual_tokenizer_dir,
        tmp_path / "data",
        tmp_path / "run",
        data={"tasks": tasks, "cfg_drop_rate": 0.0},
        optim={"lr": 3e-3, "warmup_ratio": 0.0},
        train={"steps": 300},
        eval={"splits": []},
    )
    trainer = MLLMTrainer(cfg)
    for _ in range(300):  # ~9 s on one CPU thread; loss per code 4.8 -> 0.02
        trainer.train_step()
    model = trainer.mllm
    vt = model.visual_tokenizer
    for sample in ShapesWorld(shapes).iter_split("train", 2):
        target = vt.codes_to_token_ids(vt.encode(pil_to_tensor(sample.image)[None]))[0]  # (h, w, d)
        path = measure_writing_path(model, sample.instruction, target)
        assert path.cached_vs_full_forward_agreement == 1.0
        assert path.teacher_forced_accuracy == 1.0, path.summary()
        assert path.greedy_accuracy == 1.0, path.summary()
