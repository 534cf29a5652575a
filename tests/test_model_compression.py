"""Compressors as an option of UniCodeMLLM (config, span lengths, training, save/load), inference-time token
reduction in `answer`, and the compressor ablation command."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from unicode_mllm.addons.compression import CompressorConfig
from unicode_mllm.addons.token_reduction import (
    FocusTextConfig,
    MustDropFilterConfig,
    MustDropMergeConfig,
    TokenReductionConfig,
)
from unicode_mllm.cli import main
from unicode_mllm.config import config_from_dict, config_to_dict
from unicode_mllm.constants import IMAGE_PLACEHOLDER_ID
from unicode_mllm.data.mllm_samples import MODEL_INPUTS, MLLMCollator, MLLMSampleBuilder
from unicode_mllm.errors import ConfigError, UserError
from unicode_mllm.evaluation.compressor_ablation import ablation_compressor, ablation_config, parse_compressor_list
from unicode_mllm.generation import answer, generate_images, prompt_builder
from unicode_mllm.generation.reduced_decoding import ReducedDecoder
from unicode_mllm.model import UniCodeMLLM
from unicode_mllm.splice import splice_image_embeddings
from unicode_mllm.stages.mllm import MLLMTrainConfig, MLLMTrainer

# transformers deprecations (e.g. the KV-cache argument `past_key_values` -> `cache`, removed in 5.40) must
# fail here, not surface in users' terminals.
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

POOL = CompressorConfig("pool2x", {"mode": "average"})
MERGER = CompressorConfig("qwen2vl_merger")
QUESTIONS = ["What colour is the circle?", "How many objects are there?", "Where is the red square?"]


def random_token_ids(model: UniCodeMLLM, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.visual_tokenizer.config.num_codes, (n, *model.code_shape), generator=gen)
    return model.visual_tokenizer.codes_to_token_ids(codes)  # (n, h, w, d)


def train_config(lm_dir, vt_dir, shapes_dir, out_dir, compressor: CompressorConfig | None = None, **train):
    data = {
        "model": {"lm": str(lm_dir), "visual_tokenizer": str(vt_dir)},
        "data": {"shards": str(shapes_dir), "records_per_batch": 2, "max_length": 512, "vqa_turns": 2},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        "train": {"steps": 2, "device": "cpu", "out_dir": str(out_dir), "eval_every": 100, "ckpt_every": 100, **train},
        "eval": {"splits": ["heldout"], "records": 3, "batch_size": 8},
    }
    if compressor is not None:
        data["model"]["compressor"] = compressor.to_dict()
    return config_from_dict(MLLMTrainConfig, data)


@pytest.fixture(scope="module")
def base_model(tiny_mllm_dir):
    return UniCodeMLLM.from_pretrained(tiny_mllm_dir).eval()


# ----- identity: the model as it was -------------------------------------------------------------------


def test_identity_compressor_is_bit_identical_to_the_plain_reading(tiny_lm_dir, tiny_visual_tokenizer_dir):
    model = UniCodeMLLM.from_components(
        tiny_lm_dir, tiny_visual_tokenizer_dir, compressor=CompressorConfig("identity")
    ).eval()
    assert model.tokens_per_image == 64 and not model.read_hook.compresses and model.read_hook.read_grid_hw == (8, 8)
    images = random_token_ids(model, 2)
    plain = MLLMSampleBuilder(model.text_tokenizer, model.code_shape)
    builder = prompt_builder(model)
    samples = [builder.vqa(images[0], [("What colour is the circle?", "red")]), builder.decompression(images[1])]
    plain_samples = [plain.vqa(images[0], [("What colour is the circle?", "red")]), plain.decompression(images[1])]
    for s, p in zip(samples, plain_samples, strict=True):
        assert torch.equal(s.input_ids, p.input_ids) and torch.equal(s.labels, p.labels)
    assert samples[1].image_is_uncompressed.tolist() == [True] and samples[0].image_is_uncompressed.tolist() == [False]
    batch = MLLMCollator(model.token_ids.pad)(samples)
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in MODEL_INPUTS}).logits
        # The reading before compressors existed: summed embeddings spliced as they are, then the LM.
        spliced = splice_image_embeddings(
            batch["input_ids"],
            model.embed_images(batch["image_token_ids"]),
            model.lm.get_input_embeddings(),
            batch["attention_mask"],
            pad_token_id=model.token_ids.pad,
        )
        expected = model.lm(
            inputs_embeds=spliced.inputs_embeds,
            attention_mask=spliced.attention_mask,
            position_ids=spliced.position_ids,
        ).logits
    assert torch.equal(logits, expected)


def test_files_without_compressor_keys_load_as_identity_and_answer_alike(base_model, tiny_mllm_dir, tmp_path):
    saved = json.loads((tiny_mllm_dir / "unicode_mllm.json").read_text())
    assert saved["compressor"] == {"name": "identity", "options": {}}
    assert not (tiny_mllm_dir / "compressor.safetensors").exists()
    old = {k: v for k, v in saved.items() if k not in ("compressor", "token_reduction")}
    folder = tmp_path / "old"
    base_model.save_pretrained(folder)
    (folder / "unicode_mllm.json").write_text(json.dumps(old))
    reloaded = UniCodeMLLM.from_pretrained(folder).eval()
    assert reloaded.read_hook.compressor_config == CompressorConfig() and not reloaded.token_reduction.enabled
    images = list(random_token_ids(base_model, 3, seed=4))
    kwargs = {"max_new_tokens": 5}
    assert answer(reloaded, images, QUESTIONS, **kwargs) == answer(base_model, images, QUESTIONS, **kwargs)
    (folder / "unicode_mllm.json").write_text(json.dumps({**saved, "token_reduction": {"vison": "ficoco_v"}}))
    with pytest.raises(ConfigError, match="token_reduction: unknown key 'vison'"):
        UniCodeMLLM.from_pretrained(folder)


# ----- a compressor's span everywhere ---------------------------------------------------------------------


def test_compressed_span_in_builder_prompts_and_mixed_batches(tiny_lm_dir, tiny_visual_tokenizer_dir):
    model = UniCodeMLLM.from_components(tiny_lm_dir, tiny_visual_tokenizer_dir, compressor=POOL).eval()
    assert model.tokens_per_image == 16 == model.compressor.num_output_tokens(8, 8)
    assert model.read_hook.read_grid_hw == (4, 4)
    images = random_token_ids(model, 3, seed=1)
    builder = prompt_builder(model)
    assert builder.tokens_per_image == 16 and builder.uncompressed_tokens_per_image == 64
    question = builder.question_prompt(images[0], "What colour is the circle?")
    assert int((question.input_ids == IMAGE_PLACEHOLDER_ID).sum()) == 16
    vqa = builder.vqa(images[1], [("Where is the red square?", "top left")])
    decompression = builder.decompression(images[2])
    assert int((decompression.input_ids == IMAGE_PLACEHOLDER_ID).sum()) == 64  # reads the uncompressed grid
    assert decompression.image_is_uncompressed.tolist() == [True]

    batch = MLLMCollator(model.token_ids.pad)([vqa, decompression])
    with torch.no_grad():
        together = model(**{k: batch[k] for k in MODEL_INPUTS}).logits
        embeds = model.read_image_embeds(batch["image_token_ids"], batch["image_is_uncompressed"])
        assert [tuple(e.shape) for e in embeds] == [(16, 32), (64, 32)]
        pooled = torch.nn.functional.avg_pool2d(
            model.embed_images(images[1:2]).reshape(1, 8, 8, 32).permute(0, 3, 1, 2), 2
        )  # (1, c, 4, 4): the 2x2 average of the summed embeddings
        torch.testing.assert_close(embeds[0], pooled.flatten(2).transpose(1, 2)[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(embeds[1], model.embed_images(images[2:3])[0], atol=0, rtol=0)
        for row, sample in enumerate([vqa, decompression]):
            alone = model(
                sample.input_ids[None],
                image_token_ids=sample.image_token_ids,
                image_is_uncompressed=sample.image_is_uncompressed,
            ).logits[0]
            real = batch["attention_mask"][row] == 1
            torch.testing.assert_close(together[row, real], alone, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="images_per_sample says"):
        model(
            batch["input_ids"],
            batch["attention_mask"],
            image_token_ids=batch["image_token_ids"],
            images_per_sample=torch.tensor([2, 0]),
            image_is_uncompressed=batch["image_is_uncompressed"],
        )
    answers = answer(model, list(images), QUESTIONS, max_new_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_interleaved_reading_refuses_a_compressor(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    with pytest.raises(UserError, match="needs reading='aggregated'"):
        UniCodeMLLM.from_components(tiny_lm_dir, tiny_visual_tokenizer_dir, reading="interleaved", compressor=POOL)
    too_big = CompressorConfig("deco_avgpool", {"target_grid": (16, 16)})
    with pytest.raises(ConfigError, match="cannot read the 8x8 code grid"):
        UniCodeMLLM.from_components(tiny_lm_dir, tiny_visual_tokenizer_dir, compressor=too_big)
    cfg = train_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, compressor=POOL)
    data = config_to_dict(cfg)
    data["model"]["reading"] = "interleaved"
    with pytest.raises(ConfigError, match="interleaved reading can only use compressor 'identity'"):
        config_from_dict(MLLMTrainConfig, data)
    with pytest.raises(ValueError, match="needs reading='aggregated'"):
        MLLMSampleBuilder(
            AutoTokenizer.from_pretrained(tiny_lm_dir), (8, 8, 2), reading="interleaved", read_tokens_per_image=16
        )


def test_compressor_section_reads_yaml_and_overrides(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    cfg = train_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path)
    assert cfg.model.compressor.name == "identity" and cfg.model.compressor.options == {}
    data = config_to_dict(cfg)
    changed = config_from_dict(
        MLLMTrainConfig,
        data,
        overrides=[
            "model.compressor.name=deco_avgpool",
            "model.compressor.options={target_grid: [2, 4], mlp_layers: 1}",
        ],
    )
    assert changed.model.compressor.to_compressor_config() == CompressorConfig(
        "deco_avgpool", {"target_grid": (2, 4), "mlp_layers": 1}
    )
    with pytest.raises(ConfigError, match=r"has no option\(s\) \['grid'\]"):
        config_from_dict(
            MLLMTrainConfig, data, overrides=["model.compressor.name=pool2x", "model.compressor.options={grid: 2}"]
        )
    with pytest.raises(ConfigError, match="compressor 'pool3x' is unknown"):
        config_from_dict(MLLMTrainConfig, data, overrides=["model.compressor.name=pool3x"])


# ----- trainable compressors in stage 2 ------------------------------------------------------------------


def test_trainable_compressor_trains_checkpoints_resumes_and_reloads(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    cfg = train_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, compressor=MERGER, steps=3)
    trainer = MLLMTrainer(cfg)
    compressor_params = dict(trainer.mllm.compressor.named_parameters())
    assert compressor_params and trainer.builder.tokens_per_image == 16
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in compressor_params.values())
    before = {n: p.detach().clone() for n, p in compressor_params.items()}
    trainer.train_step()
    assert all(not torch.equal(before[n], p) for n, p in compressor_params.items() if p.ndim >= 2)
    path = trainer.save_checkpoint()
    saved = trainer.ckpt.load(path).tensors["trainable"]
    assert {f"compressor.{n}" for n in compressor_params} <= set(saved)
    expected = trainer.train_step()["loss"]

    resumed = MLLMTrainer(cfg)
    resumed.load_checkpoint()
    for n, p in resumed.mllm.compressor.named_parameters():
        assert torch.equal(p, saved[f"compressor.{n}"])
    assert resumed.train_step()["loss"] == pytest.approx(expected, rel=1e-6, abs=1e-7)

    result = resumed.fit()
    final = json.loads((result.final_dir / "unicode_mllm.json").read_text())
    assert final["compressor"] == MERGER.to_dict() and (result.final_dir / "compressor.safetensors").is_file()
    assert result.metrics["train_seconds"] > 0
    reloaded = UniCodeMLLM.from_pretrained(result.final_dir).eval()
    for (n, p), (m, q) in zip(
        resumed.mllm.compressor.state_dict().items(), reloaded.compressor.state_dict().items(), strict=True
    ):
        assert n == m and torch.equal(p, q)
    (result.final_dir / "compressor.safetensors").unlink()
    with pytest.raises(UserError, match="compressor.safetensors is missing"):
        UniCodeMLLM.from_pretrained(result.final_dir)


# ----- token reduction in answer() ---------------------------------------------------------------------------


KEEP_ALL = TokenReductionConfig(
    vision="mustdrop_merge",
    mustdrop_merge=MustDropMergeConfig(window=(2, 2), threshold=2.0),  # cosine similarity never reaches 2
    llm="mustdrop",
    mustdrop=MustDropFilterConfig(layers=(0,), global_threshold=0.0, individual_threshold=0.0),  # drops nothing
)
MERGE_ALL = TokenReductionConfig(
    vision="mustdrop_merge",
    mustdrop_merge=MustDropMergeConfig(window=(2, 2), threshold=-1.0),  # every 2x2 window merges: 64 -> 16
    llm="mustdrop",
    mustdrop=MustDropFilterConfig(layers=(0,), global_threshold=0.1, individual_threshold=1.0),
    kv_policy="final_set",
)


def test_keep_all_reduction_answers_like_no_reduction(base_model, tiny_mllm_dir):
    images = list(random_token_ids(base_model, 3, seed=7))
    plain = answer(base_model, images, QUESTIONS, max_new_tokens=6, batch_size=2)
    model = UniCodeMLLM.from_pretrained(tiny_mllm_dir).eval()
    model.token_reduction = KEEP_ALL
    assert answer(model, images, QUESTIONS, max_new_tokens=6, batch_size=2) == plain


def test_enabled_reduction_reduces_the_prompt_and_answers(base_model, tiny_mllm_dir, tmp_path):
    model = UniCodeMLLM.from_pretrained(tiny_mllm_dir).eval()
    model.token_reduction = MERGE_ALL
    images = list(random_token_ids(model, 2, seed=8))
    builder = prompt_builder(model)
    batch = MLLMCollator(model.token_ids.pad, padding_side="left")(
        [builder.question_prompt(img, q) for img, q in zip(images, QUESTIONS, strict=False)]
    )
    decoder = ReducedDecoder(model, MERGE_ALL)
    with torch.no_grad():
        decoder.prefill(batch["input_ids"], batch["attention_mask"], batch["image_token_ids"])
    prompt_length = batch["input_ids"].shape[1]
    assert decoder.cache.lengths()[0] <= prompt_length - (64 - 16)  # each row: 48 of its 64 image slots merged
    answers = answer(model, images, QUESTIONS[:2], max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # Saved and reloaded with the model.
    model.save_pretrained(tmp_path / "m", copy_visual_tokenizer=False)
    assert UniCodeMLLM.from_pretrained(tmp_path / "m").token_reduction == MERGE_ALL
    # Never while an image may be written: answers that may hold images and drawings ignore the reduction.
    kwargs = {"max_new_tokens": 4, "allow_images": True}
    assert answer(model, images, QUESTIONS[:2], **kwargs) == answer(base_model, images, QUESTIONS[:2], **kwargs)
    drawn = generate_images(model, "a red circle", seed=3, decode=False).token_ids
    assert torch.equal(drawn, generate_images(base_model, "a red circle", seed=3, decode=False).token_ids)


def test_reduction_with_a_compressor_and_bad_settings(tiny_lm_dir, tiny_visual_tokenizer_dir):
    model = UniCodeMLLM.from_components(
        tiny_lm_dir,
        tiny_visual_tokenizer_dir,
        compressor=POOL,
        token_reduction=TokenReductionConfig(
            vision="mustdrop_merge", mustdrop_merge=MustDropMergeConfig(threshold=-1.0)
        ),
    ).eval()
    answers = answer(model, list(random_token_ids(model, 2, seed=2)), QUESTIONS[:2], max_new_tokens=3)
    assert len(answers) == 2
    with pytest.raises(ConfigError, match="does not exist: the LM has 2 layers"):
        model.token_reduction = TokenReductionConfig(llm="mustdrop", mustdrop=MustDropFilterConfig(layers=(5,)))
    resampler = UniCodeMLLM.from_components(
        tiny_lm_dir, tiny_visual_tokenizer_dir, compressor=CompressorConfig("perceiver", {"num_latents": 8, "depth": 1})
    )
    with pytest.raises(ConfigError, match="returns no grid"):
        resampler.token_reduction = TokenReductionConfig(vision="mustdrop_merge")
    resampler.token_reduction = TokenReductionConfig(llm="focus_text", focus_text=FocusTextConfig(layer=1))  # no grid
    assert len(answer(resampler.eval(), list(random_token_ids(model, 1)), QUESTIONS[:1], max_new_tokens=2)) == 1


# ----- the ablation command -------------------------------------------------------------------------------


def test_ablation_presets_and_config_copies(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    assert parse_compressor_list(" identity, pool2x ") == ["identity", "pool2x"]
    assert len(parse_compressor_list(None)) == 8
    with pytest.raises(UserError, match="more than once"):
        parse_compressor_list("pool2x,pool2x")
    with pytest.raises(UserError, match="compressor 'pool5x' is unknown"):
        ablation_compressor("pool5x", (8, 8), 32)
    for label in parse_compressor_list(None):
        compressor = ablation_compressor(label, (8, 8), 32).build(32)
        assert compressor.num_output_tokens(8, 8) == (64 if label == "identity" else 16)
    cfg = train_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, max_minutes=5.0)
    run = ablation_config(cfg, POOL, tmp_path / "pool")
    a, b = config_to_dict(cfg), config_to_dict(run)
    assert b["model"].pop("compressor") == POOL.to_dict() and a["model"].pop("compressor")["name"] == "identity"
    assert b["train"].pop("out_dir") == str(tmp_path / "pool") and b["train"].pop("max_minutes") is None
    a["train"].pop("out_dir"), a["train"].pop("max_minutes")
    assert a == b


def test_eval_compressors_cli_trains_each_with_equal_budgets(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    cfg = train_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path / "unused")
    config_file = tmp_path / "stage2.yaml"
    config_file.write_text(yaml.safe_dump(config_to_dict(cfg)))
    out = tmp_path / "ablation"
    code = main(
        [
            "eval",
            "compressors",
            "--config",
            str(config_file),
            "--set",
            "train.steps=2",
            "--compressors",
            "identity,qwen2vl_merger",
            "--out",
            str(out),
            "--prefill-batch-size",
            "3",
            "--prefill-repeats",
            "2",
        ]
    )
    assert code == 0
    report = json.loads((out / "comparison.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert list(rows) == ["identity", "qwen2vl_merger"]
    assert rows["identity"]["tokens_per_image"] == 64 and rows["qwen2vl_merger"]["tokens_per_image"] == 16
    assert rows["identity"]["compressor_parameters"] == 0 < rows["qwen2vl_merger"]["compressor_parameters"]
    assert rows["identity"]["steps"] == rows["qwen2vl_merger"]["steps"] == 2
    for row in rows.values():
        assert row["prefill_ms"] > 0 and row["train_seconds"] > 0 and 0.0 <= row["vqa_exact"]["heldout"] <= 1.0
        final = json.loads((out / row["label"] / "final_metrics.json").read_text())
        assert final["heldout/vqa_exact"] == row["vqa_exact"]["heldout"]
    assert report["prefill"]["batch_size"] == 3
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| compressor | options | tokens/image") and len(table) == 4
    assert (
        main(["eval", "compressors", "--config", str(config_file), "--compressors", "pool9x", "--out", str(out)]) == 2
    )
