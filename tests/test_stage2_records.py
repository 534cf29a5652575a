"""Stage 2 on records of any kind: LLaVA conversations, captions, VQAv2 questions, image folders, and a
weighted mixture of shard folders; up-front length checks and the skip fraction checked as the run goes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from unicode_mllm.config import config_from_dict, load_config
from unicode_mllm.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from unicode_mllm.data.converters import convert_image_folder, convert_llava_json
from unicode_mllm.data.mllm_samples import MLLMSampleBuilder
from unicode_mllm.data.record_samples import NO_TASK, build_record_samples, conversation_turns, record_tasks
from unicode_mllm.data.shapes import ShapesConfig, ShapesWorld
from unicode_mllm.errors import UserError
from unicode_mllm.stages.lm.config import TextTokenizerConfig
from unicode_mllm.stages.lm.corpus import sample_document
from unicode_mllm.stages.lm.text_tokenizer import train_text_tokenizer
from unicode_mllm.stages.mllm import MLLMTrainConfig, MLLMTrainer
from unicode_mllm.stages.mllm.config import DataSource

from .conftest import build_tiny_text_tokenizer

CODE_SHAPE = (2, 2, 2)


@pytest.fixture(scope="module")
def text_tokenizer():
    """The project's byte-level BPE (lossless on any text), trained on 20 shapes documents."""
    world = ShapesWorld(ShapesConfig(image_size=32)).iter_split("train", 20)
    return train_text_tokenizer([sample_document(s) for s in world], TextTokenizerConfig(vocab_size=300))


def ids() -> torch.Tensor:
    return torch.arange(10, 18).reshape(CODE_SHAPE)  # (h, w, d) LLM token ids


def labelled_text(tok, sample) -> str:
    keep = sample.labels != IGNORE_INDEX
    return tok.decode(sample.input_ids[keep & (sample.input_ids >= 0)].tolist())


LLAVA_MULTI = {
    "id": 42,  # an integer id, as some LLaVA-style exports have
    "image": "coco/a.jpg",
    "conversations": [
        {"from": "human", "value": "What is in the picture?\n<image>"},  # the image after the question
        {"from": "gpt", "value": "a cat"},
        {"from": "human", "value": "What colour is it?"},
        {"from": "gpt", "value": "brown"},
    ],
}


def test_llava_record_is_one_conversation_with_the_image_where_its_placeholder_stood(text_tokenizer):
    builder = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, template="vicuna_v1", max_length=4096)
    meta = {**LLAVA_MULTI, "has_image": True}
    samples = build_record_samples(builder, meta, ids(), ("vqa", "caption", "decompression"))
    # No caption in a LLaVA record: the drawn caption task is left out, not skipped.
    assert [s.task for s in samples] == ["vqa", "decompression"] and builder.skips.num_skipped == 0
    conversation = samples[0]
    assert conversation.sample_id == "42"
    text = text_tokenizer.decode(conversation.input_ids[conversation.input_ids >= 0].tolist())
    question_at = text.index("What is in the picture?")
    read_at = int((conversation.input_ids == IMAGE_PLACEHOLDER_ID).nonzero()[0, 0])
    # The image read comes after the question's tokens (it stood after the question in the data).
    before_read = text_tokenizer.decode(conversation.input_ids[:read_at].clamp_min(0).tolist())
    assert "What is in the picture?" in before_read and question_at >= 0
    assert int((conversation.input_ids == IMAGE_PLACEHOLDER_ID).sum()) == CODE_SHAPE[0] * CODE_SHAPE[1]
    labelled = labelled_text(text_tokenizer, conversation)
    assert "a cat" in labelled and "brown" in labelled  # every gpt turn is trained on
    assert "What" not in labelled and "picture" not in labelled  # never the human turns


def test_text_only_and_role_aliases_and_bad_conversations(text_tokenizer):
    builder = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, template="plain", strict=False)
    text_only = {
        "id": "t1",
        "has_image": False,
        "conversations": [{"from": "user", "value": "Say hi."}, {"from": "assistant", "value": "hi"}],
    }
    samples = build_record_samples(builder, text_only, None, ("vqa", "decompression", "text_to_image"))
    assert [s.task for s in samples] == ["vqa"] and samples[0].image_token_ids.shape[0] == 0
    assert "hi" in labelled_text(text_tokenizer, samples[0])
    two_images = {"conversations": [{"from": "human", "value": "<image> <image> ?"}, {"from": "gpt", "value": "x"}]}
    assert conversation_turns(two_images["conversations"], True)[0] == "image placeholder mismatch"
    assert build_record_samples(builder, {**two_images, "id": 7}, ids(), ("vqa",)) == []
    assert builder.skips.skipped == {"image placeholder mismatch": 1}  # the reasons of `data from-llava`


def test_caption_vqav2_and_folder_records(text_tokenizer):
    builder = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, template="plain", strict=False, max_length=4096)
    coco = {"id": 9, "caption": "a dog", "captions": ["a dog", "a dog on grass"]}
    assert record_tasks(coco, True) == {"caption", "text_to_image", "decompression"}
    rng = random.Random(0)
    samples = build_record_samples(builder, coco, ids(), ("caption", "text_to_image", "decompression"), rng=rng)
    assert [s.task for s in samples] == ["caption", "text_to_image", "decompression"]
    assert labelled_text(text_tokenizer, samples[0]).strip().removesuffix("</s>").strip() in coco["captions"]
    vqav2 = {"id": 3, "qa": [{"question": "Is it red?", "answer": "yes", "answers": ["yes"] * 10}]}
    samples = build_record_samples(builder, vqav2, ids(), ("vqa",))
    assert len(samples) == 1 and "yes" in labelled_text(text_tokenizer, samples[0])
    unanswered = {"id": 4, "qa": [{"question": "Is it red?", "answer": None, "answers": []}]}  # VQAv2 test-dev
    folder = {"source": "a/b.jpg", "caption": None, "height": 480, "width": 640}
    assert record_tasks(unanswered, True) == {"decompression"} and record_tasks(folder, True) == {"decompression"}
    # A record that serves none of its source's weighted tasks is a counted skip, named.
    assert build_record_samples(builder, folder, ids(), ("caption",)) == []
    assert builder.skips.skipped[NO_TASK] == 1


# ----- the stage-2 trainer on real formats -------------------------------------------------------------


def photo(name: str) -> Image.Image:
    array = getattr(skdata, name)()
    return Image.fromarray(array if array.dtype == np.uint8 else (array * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A LLaVA JSON with real photos of their own sizes (multi-turn, <image> at the end, text-only records,
    integer ids) converted to shards."""
    root = tmp_path_factory.mktemp("llava_src")
    (root / "coco").mkdir()
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    for name in names:
        photo(name).save(root / "coco" / f"{name}.jpg")
    records = []
    for i in range(12):
        name = names[i % len(names)]
        if i % 4 == 3:
            records.append(
                {"id": i, "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "hello"}]}
            )
            continue
        question = "What is this?\n<image>" if i % 2 else "<image>\nWhat is this?"
        records.append(
            {
                "id": f"rec-{i}" if i % 3 else i,
                "image": f"coco/{name}.jpg",
                "conversations": [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": name},
                    {"from": "human", "value": "Again?"},
                    {"from": "gpt", "value": "yes"},
                ],
            }
        )
    (root / "llava.json").write_text(json.dumps(records))
    out = tmp_path_factory.mktemp("llava_shards")
    convert_llava_json(root / "llava.json", root, out, progress=False, maxcount=5)
    return out


def make_config(lm, vt, out, data: dict, **sections) -> MLLMTrainConfig:
    raw = {
        "model": {"lm": str(lm), "visual_tokenizer": str(vt)},
        "data": {"records_per_batch": 2, "max_length": 500, "vqa_turns": 2, **data},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        "train": {"steps": 4, "device": "cpu", "out_dir": str(out), "log_every": 1, "eval_every": 100},
        "eval": {"splits": [], "records": 4, "batch_size": 8},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(MLLMTrainConfig, raw)


def two_sources(shapes_dir, llava_dir) -> dict:
    return {
        "sources": [
            {"name": "shapes", "shards": str(shapes_dir), "weight": 1.0},
            {
                "name": "llava",
                "shards": str(llava_dir),
                "weight": 1.0,
                "tasks": {"vqa": 1.0, "caption": 0.0, "text_to_image": 0.0, "decompression": 0.5},
            },
        ]
    }


def test_mixture_of_shapes_and_llava_trains_counts_per_source_and_resumes_exactly(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, llava_dir, tmp_path
):
    cfg = make_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tmp_path / "run", two_sources(tiny_shapes_dir, llava_dir))
    trainer = MLLMTrainer(cfg)
    for _ in range(6):
        trainer.next_samples()
    drawn = trainer._batches.position()
    assert set(drawn["sources"]) == {"shapes", "llava"} and drawn["draws"] == 6
    by_source = trainer.skips.state_dict()["by_source"]
    assert set(by_source) == {"shapes", "llava"} and by_source["llava"]["built"] > 0
    assert trainer.skips.num_skipped == 0, trainer.skips.summary()  # text-only records: text conversations

    # Exact resume: a fresh trainer at the saved position gives the same next samples.
    trainer.step = 6
    trainer.save_checkpoint()
    expected = trainer.next_samples()
    resumed = MLLMTrainer(cfg)
    resumed.load_checkpoint()
    again = resumed.next_samples()
    assert [s.sample_id for s in again] == [s.sample_id for s in expected]
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(again, expected, strict=True))


def test_train_mllm_on_llava_photos_of_any_size(tiny_lm_dir, tiny_visual_tokenizer_dir, llava_dir, tmp_path):
    cfg = make_config(
        tiny_lm_dir,
        tiny_visual_tokenizer_dir,
        tmp_path / "run",
        {"shards": str(llava_dir), "tasks": {"vqa": 1.0, "caption": 0.0, "text_to_image": 0.0, "decompression": 0.5}},
    )
    trainer = MLLMTrainer(cfg)
    logs = trainer.train_step()
    assert logs["loss"] > 0 and trainer.skips.num_skipped == 0
    assert "skipped 0 of" in trainer.reader_summary()  # photos of other sizes are centre-cropped, not skipped


def test_max_length_beyond_the_lm_positions_is_refused_up_front(tmp_path, tiny_visual_tokenizer_dir, tiny_shapes_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tiny_text_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2)
    lm_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    cfg = make_config(lm_dir, tiny_visual_tokenizer_dir, tmp_path / "run", {"shards": str(tiny_shapes_dir)})
    with pytest.raises(UserError, match=r"data.max_length=500 exceeds the 128 positions"):
        MLLMTrainer(cfg)  # was: internal error (IndexError) at the first long sample


def test_max_length_beyond_rope_positions_is_refused_up_front(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    """The tiny LLaMA (RoPE) declares 512 positions: 640-token samples would train past them without a word, and
    `generate` would then refuse the model."""
    data = {"shards": str(tiny_shapes_dir), "max_length": 640}
    cfg = make_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tmp_path / "run", data)
    with pytest.raises(UserError, match=r"data.max_length=640 exceeds the 512 positions.*data.max_length=512"):
        MLLMTrainer(cfg)


def test_skip_fraction_is_checked_as_the_run_goes(tiny_lm_dir, tiny_visual_tokenizer_dir, tmp_path):
    """A short run whose records mostly serve no task fails before an epoch ends (was: exit 0, one info line)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(40):
        photo("astronaut").resize((40 + i, 36)).save(folder / f"p{i:02d}.png")
        if i % 4 == 0:
            (folder / f"p{i:02d}.txt").write_text(f"an astronaut number {i}")
    shards = tmp_path / "shards"
    convert_image_folder(folder, shards, progress=False, maxcount=100)
    cfg = make_config(
        tiny_lm_dir,
        tiny_visual_tokenizer_dir,
        tmp_path / "run",
        {"shards": str(shards), "tasks": {"vqa": 0.0, "caption": 1.0, "text_to_image": 0.0, "decompression": 0.0}},
    )
    trainer = MLLMTrainer(cfg)
    with pytest.raises(UserError, match=r"no task for record.*data.max_skip_fraction"):
        for _ in range(60):  # 40 records, 30 of them without a caption: the limit trips well before step 60
            trainer.next_samples()


def test_data_source_config_rules(tmp_path):
    with pytest.raises(Exception, match="data.shards and data.sources are both set"):
        config_from_dict(MLLMTrainConfig, {"data": {"shards": "a", "sources": [{"shards": "b"}]}})
    with pytest.raises(Exception, match="repeated names"):
        config_from_dict(MLLMTrainConfig, {"data": {"sources": [{"shards": "x/a"}, {"shards": "y/a"}]}})
    cfg = config_from_dict(MLLMTrainConfig, {"data": {"shards": "/d/llava"}})
    assert cfg.data.resolved_sources() == [
        DataSource(shards="/d/llava", name="llava", weight=1.0, tasks=cfg.data.tasks, train_split="train")
    ]


def test_the_7b_recipe_reads_its_sources(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, llava_dir, tmp_path):
    """configs/mllm/vicuna7b_lora.yaml names sources the trainer reads: its data pipeline is built on tiny stand-in
    shards at the recipe's own data settings (only the folders, the models and the device swapped)."""
    cfg = load_config(MLLMTrainConfig, "configs/mllm/vicuna7b_lora.yaml")
    assert [s.name for s in cfg.data.resolved_sources()] == ["llava", "captions"]
    # Stand-ins: LLaVA shards and a captioned photo folder (tokenized on the fly), the tiny models, the CPU.
    folder = tmp_path / "captioned"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        photo(name).save(folder / f"{name}.jpg")
        (folder / f"{name}.txt").write_text(f"a photo of {name}")
    convert_image_folder(folder, tmp_path / "captions", progress=False)
    cfg.data.sources[0].shards, cfg.data.sources[1].shards = str(llava_dir), str(tmp_path / "captions")
    cfg.data.token_ids = "encode"
    cfg.data.num_workers = 0
    cfg.model.lm, cfg.model.visual_tokenizer = str(tiny_lm_dir), str(tiny_visual_tokenizer_dir)
    cfg.model.template = "plain"
    cfg.model.lora.r, cfg.model.lora.alpha = 2, 4
    cfg.data.max_length = 512
    cfg.data.records_per_batch = 2
    cfg.train.device, cfg.train.mixed_precision, cfg.train.gradient_checkpointing = "cpu", "no", False
    cfg.train.out_dir = str(tmp_path / "run")
    cfg.eval.splits = ()
    trainer = MLLMTrainer(cfg)
    samples = trainer.next_samples()
    assert samples and {s.task for s in samples} <= {"vqa", "caption", "text_to_image", "decompression"}
    trainer.check_skips()


def test_a_second_split_converted_into_a_folder_keeps_the_first(tmp_path):
    """COCO train then val into one folder: the manifest lists both (was: only the last one written)."""
    from unicode_mllm.shard_manifest import read_manifest

    folder = tmp_path / "photos"
    folder.mkdir()
    photo("coffee").save(folder / "a.png")
    convert_image_folder(folder, tmp_path / "out", split="train", progress=False)
    convert_image_folder(folder, tmp_path / "out", split="val", progress=False)
    assert sorted(read_manifest(tmp_path / "out").splits) == ["train", "val"]
