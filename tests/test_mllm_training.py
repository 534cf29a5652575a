"""Stage 2 training: task mixture, the sample stream, teacher-forced evaluation, the loop, resume, LoRA."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import Counter

import pytest
import torch

from unicode_mllm.config import config_from_dict
from unicode_mllm.data.mllm_samples import MLLMCollator, MLLMSample, MLLMSampleBuilder
from unicode_mllm.data.stream import StreamingDataset, collate
from unicode_mllm.errors import UserError
from unicode_mllm.generation.batch_prefill import prefill_prompts
from unicode_mllm.model import UniCodeMLLM
from unicode_mllm.stages.mllm import (
    EvalSample,
    MLLMTrainConfig,
    MLLMTrainer,
    RecordTokenIds,
    TaskMixture,
    evaluate_teacher_forced,
    length_chunks,
    train_mllm,
)
from unicode_mllm.visual_tokenizer.extract import extract_codes


def make_config(lm_dir, vt_dir, shapes_dir, out_dir, **sections) -> MLLMTrainConfig:
    data = {
        "model": {"lm": str(lm_dir), "visual_tokenizer": str(vt_dir)},
        "data": {"shards": str(shapes_dir), "records_per_batch": 2, "max_length": 512, "vqa_turns": 2},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        "train": {
            "steps": 3,
            "device": "cpu",
            "out_dir": str(out_dir),
            "log_every": 1,
            "eval_every": 100,
            "ckpt_every": 100,
        },
        "eval": {"splits": ["heldout"], "records": 4, "batch_size": 8},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(MLLMTrainConfig, data)


# ----- the task mixture ---------------------------------------------------------------------------


def test_mixture_weights_are_expected_samples_per_record():
    mixture = TaskMixture({"vqa": 2.0, "text_to_image": 0.5, "decompression": 0.25}, cfg_drop_rate=0.2, seed=3)
    counts: Counter[str] = Counter()
    drops = []
    for i in range(4000):
        plan = mixture.plan(f"rec-{i}", epoch=0)
        counts.update(plan.tasks)
        drops += plan.drop_prompt
        assert len(plan.drop_prompt) == plan.tasks.count("text_to_image")
    assert counts["vqa"] == 8000 and counts["caption"] == 0
    assert abs(counts["text_to_image"] / 4000 - 0.5) < 0.03
    assert abs(counts["decompression"] / 4000 - 0.25) < 0.03
    assert abs(sum(drops) / len(drops) - 0.2) < 0.04


def test_mixture_plans_are_replayable_per_record_and_epoch():
    mixture = TaskMixture({"vqa": 0.5, "text_to_image": 0.5}, cfg_drop_rate=0.5, seed=0)
    again = TaskMixture({"vqa": 0.5, "text_to_image": 0.5}, cfg_drop_rate=0.5, seed=0)
    keys = [f"k{i}" for i in range(50)]
    assert [mixture.plan(k, 1) for k in keys] == [again.plan(k, 1) for k in reversed(keys)][::-1]
    assert [mixture.plan(k, 1) for k in keys] != [mixture.plan(k, 2) for k in keys]


def test_mixture_rejects_unknown_tasks_and_all_zero_weights():
    with pytest.raises(ValueError, match="unknown tasks"):
        TaskMixture({"vqa": 1.0, "segmentation": 1.0})
    with pytest.raises(ValueError, match="every task weight is 0"):
        TaskMixture({"vqa": 0.0})


# ----- teacher-forced evaluation ------------------------------------------------------------------


def test_teacher_forced_exact_match_is_greedy_decoding(tiny_mllm_dir):
    """The label run that greedy decoding produces scores 1; change one token and it scores 0."""
    model = UniCodeMLLM.from_pretrained(tiny_mllm_dir).eval()
    builder = MLLMSampleBuilder(model.text_tokenizer, model.code_shape)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, model.visual_tokenizer.config.num_codes, model.code_shape, generator=gen)
    image = model.visual_tokenizer.codes_to_token_ids(codes)
    prompt = builder.question_prompt(image, "What colour is the circle?")
    with torch.no_grad():  # greedy over the whole vocabulary, 4 tokens
        decoder, logits = prefill_prompts(model, [prompt])
        ids = [logits.argmax(dim=-1)]
        for _ in range(3):
            ids.append(decoder.step(ids[-1]).argmax(dim=-1))
    greedy = torch.stack(ids, dim=1)[0]
    input_ids = torch.cat([prompt.input_ids, greedy])
    labels = torch.cat([torch.full_like(prompt.input_ids, -100), greedy])
    good = EvalSample(MLLMSample(input_ids, labels, image[None], "vqa"), "heldout", "colour")
    bad_labels = labels.clone()
    bad_labels[-1] = (bad_labels[-1] + 1) % len(model.text_tokenizer)
    bad = EvalSample(MLLMSample(input_ids, bad_labels, image[None], "vqa"), "heldout", "colour")
    collator = MLLMCollator(pad_token_id=model.token_ids.pad)
    assert evaluate_teacher_forced(model, [good], collator)["heldout/vqa_exact_colour"] == 1.0
    assert evaluate_teacher_forced(model, [bad], collator)["heldout/vqa_exact"] == 0.0
    both = evaluate_teacher_forced(model, [good, bad], collator, batch_size=2)  # padding changes nothing
    assert both["heldout/vqa_exact"] == 0.5


# ----- the loop ---------------------------------------------------------------------------------------


def test_training_runs_logs_per_task_and_saves_a_loadable_model(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    tasks = {"vqa": 1.0, "caption": 0.5, "text_to_image": 1.0, "decompression": 1.0}
    cfg = make_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, data={"tasks": tasks})
    result = train_mllm(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert {"loss_vqa", "loss_text_to_image", "loss_decompression"} <= set().union(*train_rows)
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert 0.0 <= final["heldout/vqa_exact"] <= 1.0 and "heldout/code_acc_decompression" in final
    assert (tmp_path / "curves.png").is_file()
    model = UniCodeMLLM.from_pretrained(result.final_dir)
    assert model.code_shape == (8, 8, 2)


def test_resume_gives_the_same_next_step_loss(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    cfg = make_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, data={"cfg_drop_rate": 0.5})
    first = MLLMTrainer(cfg)
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    counts = first.skips.state_dict()
    expected = [first.train_step()["loss"] for _ in range(2)]
    second = MLLMTrainer(cfg)
    second.load_checkpoint()
    assert second.step == 2 and second.skips.state_dict() == counts and counts["built"] > 0
    assert [second.train_step()["loss"] for _ in range(2)] == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_precomputed_token_ids_equal_encoding_and_feed_training(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    codes_dir = tmp_path / "codes"
    extract_codes(tiny_visual_tokenizer_dir, tiny_shapes_dir, codes_dir, splits=["train", "heldout"])
    cfg = make_config(
        tiny_lm_dir, tiny_visual_tokenizer_dir, codes_dir, tmp_path / "run", data={"token_ids": "precomputed"}
    )
    trainer = MLLMTrainer(cfg)
    records = collate([r for r in StreamingDataset(codes_dir, "train", shuffle=False, image_format="tensor")][:6])
    precomputed = RecordTokenIds(trainer.mllm.visual_tokenizer, "precomputed")(records, trainer.builder)
    encoded = RecordTokenIds(trainer.mllm.visual_tokenizer, "encode")(records, trainer.builder)
    assert all(torch.equal(a, b) for a, b in zip(precomputed, encoded, strict=True))
    assert trainer.train_step()["loss"] > 0 and trainer.skips.num_skipped == 0


def test_precomputed_ids_from_another_tokenizer_are_reported(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    cfg = make_config(
        tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, data={"token_ids": "precomputed"}
    )
    trainer = MLLMTrainer(cfg)
    with pytest.raises(UserError, match="missing visual_token_ids"):
        trainer.next_samples()  # every record lacks ids: the skip fraction check refuses the epoch


def test_ids_written_by_a_different_tokenizer_of_the_same_shape_are_skipped(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    codes_dir = tmp_path / "codes"
    extract_codes(tiny_visual_tokenizer_dir, tiny_shapes_dir, codes_dir, splits=["train"])
    cfg = make_config(tiny_lm_dir, tiny_visual_tokenizer_dir, codes_dir, tmp_path / "run", data={"token_ids": "auto"})
    trainer = MLLMTrainer(cfg)
    records = collate([r for r in StreamingDataset(codes_dir, "train", shuffle=False, image_format="tensor")][:4])
    same = RecordTokenIds(trainer.mllm.visual_tokenizer, "auto")(records, trainer.builder)
    assert all(ids is not None for ids in same) and trainer.builder.skips.num_skipped == 0
    # Another tokenizer with the same code shape: one encoder weight moved, so its ids mean other pixels.
    other = copy.deepcopy(trainer.mllm.visual_tokenizer)
    with torch.no_grad():
        next(other.encoder.parameters()).add_(1e-3)
    assert other.encoding_fingerprint() != trainer.mllm.visual_tokenizer.encoding_fingerprint()
    foreign = RecordTokenIds(other, "auto")(records, trainer.builder)
    assert foreign == [None] * 4
    assert trainer.builder.skips.skipped["visual_token_ids of another tokenizer"] == 4


def test_too_long_tasks_are_refused_up_front(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    tasks = {"vqa": 1.0, "text_to_image": 0.0, "decompression": 1.0}
    cfg = make_config(
        tiny_lm_dir,
        tiny_visual_tokenizer_dir,
        tiny_shapes_dir,
        tmp_path,
        data={"tasks": tasks, "max_length": 200, "max_skip_fraction": 1.0},
    )
    with pytest.raises(UserError, match=r"every decompression sample is at least \d+ tokens.*data.max_length=200"):
        MLLMTrainer(cfg)  # up front: every decompression sample would be a skip
    cfg.data.tasks.decompression = 0.0
    trainer = MLLMTrainer(cfg)
    shortest = trainer.builder.shortest_length("decompression")
    roomy = dataclasses.replace(trainer.builder, max_length=10**6, skips=None)
    real = roomy.decompression(torch.zeros(trainer.builder.code_shape, dtype=torch.long))
    assert real is not None and len(real) == shortest  # the up-front length is the real one
    samples = trainer.next_samples()
    assert samples and all(len(s) <= 200 for s in samples) and trainer.skips.num_skipped == 0


def test_lora_training_merges_into_the_saved_model(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    cfg = make_config(
        tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, model={"lora": lora}, train={"steps": 2}
    )
    trainer = MLLMTrainer(cfg)
    trainable = {n for n, p in trainer.mllm.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("embed_tokens" in n for n in trainable)
    assert not any("q_proj.base_layer" in n for n in trainable)
    result = trainer.fit()
    merged = trainer.mllm.eval()  # save_final merged the adapters in memory
    assert not merged.has_lora and (tmp_path / "final_lora" / "adapter_config.json").is_file()
    reloaded = UniCodeMLLM.from_pretrained(result.final_dir).eval()
    batch = trainer.collator(trainer.next_samples())
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "image_token_ids", "images_per_sample")}
    with torch.no_grad():
        assert torch.equal(merged(**inputs).logits, reloaded(**inputs).logits)


def test_cli_train_mllm_reports_a_missing_visual_tokenizer_in_one_line(tiny_lm_dir, tmp_path, capsys):
    from unicode_mllm.cli import main

    config = tmp_path / "mllm.yaml"
    config.write_text(f"model:\n  lm: {tiny_lm_dir}\n  visual_tokenizer: {tmp_path / 'nope'}\n")
    code = main(["train-mllm", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "is not a folder; train one with train-tokenizer" in err


def test_length_chunks_respect_the_token_budget_and_keep_every_sample():
    samples = [
        MLLMSample(torch.ones(n, dtype=torch.long), torch.ones(n, dtype=torch.long), torch.zeros(0, 1, 1, 1), "vqa")
        for n in (80, 500, 90, 85, 300, 1000, 81)
    ]
    chunks = length_chunks(samples, max_tokens=600)
    assert sorted(len(s) for c in chunks for s in c) == sorted(len(s) for s in samples)
    assert [[len(s) for s in c] for c in chunks] == [[1000], [500], [300, 90], [85, 81, 80]]
    assert all(len(c) * len(c[0]) <= 600 or len(c) == 1 for c in chunks)


def test_step_loss_is_the_mean_over_the_steps_labelled_tokens(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    """Cutting a step into more forward passes changes nothing but rounding."""
    losses = []
    for budget in (100_000, 300):
        cfg = make_config(
            tiny_lm_dir,
            tiny_visual_tokenizer_dir,
            tiny_shapes_dir,
            tmp_path / str(budget),
            data={"max_tokens_per_forward": budget},
            optim={"grad_accum": 2},
        )
        logs = MLLMTrainer(cfg).train_step()
        losses.append(logs["loss"])
        assert (logs["forward_passes"] == 2) == (budget == 100_000)  # one pass per group, or more
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_task_weighting_averages_the_task_means(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    tasks = {"vqa": 1.0, "caption": 0.0, "text_to_image": 1.0, "decompression": 1.0}
    data = {"tasks": tasks, "cfg_drop_rate": 0.0, "loss_weighting": "tasks"}
    cfg = make_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, data=data)
    logs = MLLMTrainer(cfg).train_step()
    task_means = [logs["loss_vqa"], logs["loss_text_to_image"], logs["loss_decompression"]]
    assert logs["loss"] == pytest.approx(sum(task_means) / 3, rel=1e-5)
    weighted = {**data, "loss_weights": {"vqa": 2.0, "caption": 1.0, "text_to_image": 1.0, "decompression": 0.0}}
    cfg = make_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path / "w", data=weighted)
    logs = MLLMTrainer(cfg).train_step()
    assert logs["loss"] == pytest.approx((2 * logs["loss_vqa"] + logs["loss_text_to_image"]) / 3, rel=1e-5)


def test_an_lm_stored_in_fp16_trains_with_fp32_master_weights(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    # Many 7B checkpoints are stored in fp16 and transformers loads dtype 'auto': AdamW on fp16 weights
    # underflows its eps and turns rows without gradient into NaN. Stage 2 keeps fp32 master weights.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp16_dir = tmp_path / "lm_fp16"
    AutoModelForCausalLM.from_pretrained(tiny_lm_dir).half().save_pretrained(fp16_dir)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(fp16_dir)
    assert AutoModelForCausalLM.from_pretrained(fp16_dir).dtype == torch.float16  # the hazard is real
    cfg = make_config(fp16_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path / "run", train={"steps": 1})
    trainer = MLLMTrainer(cfg)
    assert {p.dtype for p in trainer.mllm.lm.parameters()} == {torch.float32}
    trainer.train_step()
    assert all(torch.isfinite(p).all() for p in trainer.mllm.lm.parameters())


def test_gradient_checkpointing_with_lora_trains_the_adapters(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    cfg = make_config(
        tiny_lm_dir,
        tiny_visual_tokenizer_dir,
        tiny_shapes_dir,
        tmp_path,
        model={"lora": lora},
        train={"steps": 1, "gradient_checkpointing": True},
    )
    trainer = MLLMTrainer(cfg)
    lm = trainer.mllm.lm
    new_name = hasattr(lm, "activation_checkpointing_enable")  # transformers >= 5.x
    assert lm.is_activation_checkpointing if new_name else lm.is_gradient_checkpointing
    before = {n: p.detach().clone() for n, p in trainer.mllm.named_parameters() if "lora_B" in n}
    trainer.train_step()
    after = dict(trainer.mllm.named_parameters())
    assert before and all(not torch.equal(after[n], p) for n, p in before.items())  # lora_B starts at 0
