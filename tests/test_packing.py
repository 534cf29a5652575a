"""Sequence packing (data/packing.py): rows, positions, per-sample logits and the stage-2 loss."""

from __future__ import annotations

import logging
import random

import pytest
import torch
import transformers

from unicode_mllm.constants import IGNORE_INDEX
from unicode_mllm.data.mllm_samples import MODEL_INPUTS, MLLMSample
from unicode_mllm.data.packing import (
    PackedCollator,
    pack_rows,
    packed_chunks,
    packing_problem,
    padded_tokens,
    row_chunks,
    row_length,
)
from unicode_mllm.stages.mllm import MLLMTrainer
from unicode_mllm.stages.mllm import trainer as trainer_module

from .test_mllm_training import make_config


def _sample(n: int, task: str = "vqa", images: int = 0) -> MLLMSample:
    ids = torch.arange(n) + 3
    return MLLMSample(ids, ids.clone(), torch.zeros(images, 1, 1, 1, dtype=torch.long), task, f"s{n}")


def test_rows_keep_every_sample_under_the_capacity_and_are_deterministic():
    samples = [_sample(n) for n in (80, 500, 90, 85, 300, 640, 81, 120, 60)]
    rows = pack_rows(samples, capacity=640)
    assert sorted(id(s) for r in rows for s in r) == sorted(id(s) for s in samples)
    assert all(row_length(r) <= 640 for r in rows)
    assert [[len(s) for s in r] for r in rows] == [[640], [500, 120], [300, 90, 85, 81, 80], [60]]
    assert [[len(s) for s in r] for r in pack_rows(samples, 640)] == [[len(s) for s in r] for r in rows]
    chunks = packed_chunks(samples, max_tokens=1300, row_capacity=640)
    assert [[row_length(r) for r in c] for c in chunks] == [[640, 636], [620, 60]]
    assert all(len(c) * row_length(c[0]) <= 1300 for c in chunks)
    # A sample longer than the row capacity gets a row of its own; capacity grows to the longest sample.
    chunks = packed_chunks([_sample(50), _sample(700), _sample(30)], 4096, 640)
    assert [[[len(s) for s in r] for r in c] for c in chunks] == [[[700], [50, 30]]]


def test_the_row_capacity_is_the_one_that_pads_least():
    rng = random.Random(0)
    for _ in range(20):  # groups like the tiny preset's: VQA, captions, text-to-image, decompression lengths
        samples = [_sample(rng.choice((117, 118, 110, 353, 329, 582))) for _ in range(rng.randint(5, 30))]
        chunks = packed_chunks(samples, max_tokens=4096, row_capacity=640)
        assert sorted(id(s) for c in chunks for r in c for s in r) == sorted(id(s) for s in samples)
        assert all(row_length(r) <= 640 for c in chunks for r in c)
        assert all(len(c) * row_length(c[0]) <= 4096 for c in chunks)
        fixed = row_chunks(pack_rows(samples, 640), 4096)
        assert padded_tokens(chunks) <= padded_tokens(fixed)
    assert padded_tokens(chunks) < padded_tokens(fixed)  # and strictly less for this one


def test_packed_collator_restarts_positions_and_hides_each_samples_first_label():
    rows = [[_sample(4, images=1), _sample(3, "caption")], [_sample(2, images=2)]]
    batch = PackedCollator(pad_token_id=0)(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 0, 0, 0, 0]]
    assert batch["sample_index"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [2, 2, -1, -1, -1, -1, -1]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 0, 0, 0, 0, 0]]
    assert batch["labels"][0, 0] == IGNORE_INDEX and batch["labels"][0, 4] == IGNORE_INDEX
    assert batch["labels"][0, 5] == 4 and batch["labels"][1, 1] == 4
    assert batch["images_per_sample"].tolist() == [1, 2] and batch["image_token_ids"].shape[0] == 3
    assert batch["tasks"] == ["vqa", "caption", "vqa"]


TINY_LMS = {
    "gpt2 (learned absolute positions)": lambda: transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "gemma": lambda: transformers.GemmaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        pad_token_id=0,
    ),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(TINY_LMS))
def test_architectures_keep_packed_samples_apart(name, attn):
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(TINY_LMS[name](), attn_implementation=attn)
    assert packing_problem(lm, 100, "cpu", use_cache=False) is None
    # With a KV cache transformers builds a padding-only mask: the check sees samples attend across the row.
    assert "position_ids" in packing_problem(lm, 100, "cpu", use_cache=True)


def test_an_lm_whose_mask_ignores_restarting_positions_is_found():
    # OPT derives its learned positions from the attention mask and its mask ignores position_ids.
    config = transformers.OPTConfig(
        vocab_size=100,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    )
    torch.manual_seed(0)
    problem = packing_problem(transformers.AutoModelForCausalLM.from_config(config), 100, "cpu", use_cache=False)
    assert problem is not None and "position_ids" in problem


def _trainer(tiny_lm_dir, vt_dir, shapes_dir, out_dir, packing: bool, model=None, **data) -> MLLMTrainer:
    data = {"cfg_drop_rate": 0.0, "packing": packing, "records_per_batch": 4, **data}
    return MLLMTrainer(make_config(tiny_lm_dir, vt_dir, shapes_dir, out_dir, data=data, model=model or {}))


@pytest.mark.parametrize("compressor", ["identity", "pool2x"])
def test_packed_rows_give_each_sample_its_own_logits_with_images(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, compressor
):
    """The tiny LLaMA + visual tokenizer: image embeddings and positions follow their samples into the row (with
    a compressor, compressed reads and the decompression samples' full grids side by side)."""
    model = {"compressor": {"name": compressor}}
    trainer = _trainer(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, True, model=model)
    assert trainer.packing()
    samples = trainer.next_samples()
    assert {s.task for s in samples} >= {"vqa", "decompression"} and any(s.image_token_ids.shape[0] for s in samples)
    rows = pack_rows(samples, capacity=max(512, max(len(s) for s in samples)))
    assert any(len(r) > 1 for r in rows)
    batch = trainer.packed_collator(rows)
    model = trainer.mllm.eval()
    with torch.no_grad():
        inputs = {k: batch[k] for k in MODEL_INPUTS if k != "labels"}
        packed = model(**inputs, position_ids=batch["position_ids"]).logits  # (b, t, V)
        for index, sample in enumerate(batch["samples"]):
            alone = trainer.collator([sample])
            expected = model(**{k: alone[k] for k in MODEL_INPUTS if k != "labels"}).logits[0]  # (n, V)
            got = packed[batch["sample_index"] == index]  # (n, V)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weighting", ["tokens", "tasks"])
def test_a_packed_step_has_the_unpacked_loss_and_pads_less(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, weighting
):
    """The trainer's normalisation (over the step's labelled tokens, or each task's token mean) is per sample:
    the same loss whichever row a sample sits in, and the same update (the second step's loss)."""
    logs = {}
    for packing in (False, True):
        trainer = _trainer(
            tiny_lm_dir,
            tiny_visual_tokenizer_dir,
            tiny_shapes_dir,
            tmp_path / str(packing),
            packing,
            loss_weighting=weighting,
        )
        logs[packing] = [trainer.train_step() for _ in range(2)]  # the second step: after an update
    for unpacked, packed in zip(logs[False], logs[True], strict=True):
        assert packed["tokens"] == unpacked["tokens"] and packed["samples"] == unpacked["samples"]
        assert packed["padded_tokens"] < unpacked["padded_tokens"]
        keys = {k for k in unpacked if k.startswith("loss")}
        assert keys == {k for k in packed if k.startswith("loss")} and {"loss", "loss_vqa"} <= keys
        for key in keys:  # the step's loss and every task's token mean
            assert packed[key] == pytest.approx(unpacked[key], rel=1e-5), key


def test_an_lm_that_cannot_pack_falls_back_to_length_chunks_with_one_line(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(trainer_module, "packing_problem", lambda *a, **k: "cannot (a test)")
    trainer = _trainer(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, True)
    with caplog.at_level(logging.INFO, logger=trainer_module.__name__):
        logs = trainer.train_step()
        trainer.train_step()
    lines = [r.getMessage() for r in caplog.records if "data.packing" in r.getMessage()]
    assert len(lines) == 1 and "cannot (a test)" in lines[0]
    unpacked = _trainer(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path / "u", False).train_step()
    assert logs["padded_tokens"] == unpacked["padded_tokens"]


def test_resume_under_packing_gives_the_same_next_step_losses(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    first = _trainer(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, True, cfg_drop_rate=0.5)
    first.train_step()
    first.save_checkpoint()
    expected = [first.train_step() for _ in range(2)]
    second = _trainer(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, True, cfg_drop_rate=0.5)
    second.load_checkpoint()
    got = [second.train_step() for _ in range(2)]
    assert [g["padded_tokens"] for g in got] == [e["padded_tokens"] for e in expected]
    assert [g["loss"] for g in got] == pytest.approx([e["loss"] for e in expected], rel=1e-6, abs=1e-7)
