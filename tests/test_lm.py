"""Stage 0, the embedded tiny LM: text tokenizer, corpus, pre-training loop, exact resume, reload, inspection."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from unicode_mllm.config import load_config
from unicode_mllm.constants import IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START
from unicode_mllm.data.shapes import ShapesConfig, ShapesWorld
from unicode_mllm.errors import ConfigError, UserError
from unicode_mllm.runtime.checkpoint import CheckpointManager, atomic_write_json
from unicode_mllm.stages.lm import (
    MULTIMODAL_TOKENS,
    SPECIAL_TOKENS,
    CorpusConfig,
    DataPosition,
    LMModelConfig,
    LMOptimConfig,
    LMTrainConfig,
    PackedWindows,
    TextTokenizerConfig,
    WarmupCosine,
    build_corpus,
    build_model,
    build_optimizer,
    check_text_tokenizer,
    embedding_structure_report,
    encode_corpus,
    lm_loss,
    sample_document,
    train_lm,
    train_text_tokenizer,
)

TINY = [
    "corpus.train_samples=40",
    "corpus.val_samples=8",
    "model.hidden_size=32",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.intermediate_size=64",
    "model.max_position_embeddings=64",
    "optim.warmup_steps=1",
    "optim.lr=1e-2",
    "train.steps=4",
    "train.batch_size=2",
    "train.seq_len=32",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=2",
    "train.ckpt_every=2",
    "train.device=cpu",
]
TINY_MODEL = LMModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return build_corpus(CorpusConfig(train_samples=40, val_samples=8), "train")


@pytest.fixture(scope="module")
def text_tokenizer(corpus) -> PreTrainedTokenizerFast:
    return train_text_tokenizer(corpus, TextTokenizerConfig())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted 4-step run (checkpoints at steps 2 and 4), shared by the tests below."""
    cfg = load_config(LMTrainConfig, overrides=TINY)
    out_dir = tmp_path_factory.mktemp("lm") / "run"
    return cfg, out_dir, train_lm(cfg, out_dir)


def read_log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------- text tokenizer


def test_text_tokenizer_round_trips_text(corpus, text_tokenizer):
    texts = [corpus[0], "Héllo  wörld\n\ttabs, 123 ☃ zebra?", " leading space", "A small red circle."]
    for text in texts:
        ids = text_tokenizer(text)["input_ids"]
        assert ids[0] == text_tokenizer.bos_token_id and ids[-1] != text_tokenizer.eos_token_id
        assert text_tokenizer.decode(ids, skip_special_tokens=True) == text
    # Whole words of the world are single tokens (BPE merged them).
    assert len(text_tokenizer.encode(" purple", add_special_tokens=False)) == 1


def test_text_tokenizer_training_is_deterministic(corpus, text_tokenizer):
    again = train_text_tokenizer(corpus, TextTokenizerConfig())
    assert again.get_vocab() == text_tokenizer.get_vocab()
    smaller = train_text_tokenizer(corpus, TextTokenizerConfig(vocab_size=300))
    assert len(smaller) == 300 < len(text_tokenizer)


def test_multimodal_specials_are_single_special_tokens(text_tokenizer):
    assert text_tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert MULTIMODAL_TOKENS == (IMAGE_START, IMAGE_END, IMAGE_PLACEHOLDER)
    ids = text_tokenizer.encode(f"a {IMAGE_START}{IMAGE_PLACEHOLDER}{IMAGE_END} b", add_special_tokens=False)
    for token in MULTIMODAL_TOKENS:
        token_id = text_tokenizer.convert_tokens_to_ids(token)
        assert ids.count(token_id) == 1
        assert token_id in text_tokenizer.all_special_ids
    assert text_tokenizer.pad_token_id in text_tokenizer.all_special_ids
    check_text_tokenizer(text_tokenizer)


def test_check_text_tokenizer_rejects_split_multimodal_token(text_tokenizer):
    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(text_tokenizer.backend_tokenizer.to_str()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    with pytest.raises(ValueError, match="'<img>' .* is not special"):
        check_text_tokenizer(plain)


# ------------------------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_matches_the_world():
    cfg = CorpusConfig(train_samples=5, val_samples=3)
    train = build_corpus(cfg, "train")
    assert train == build_corpus(cfg, "train")
    assert len(train) == 5 and len(build_corpus(cfg, "val")) == 3
    assert build_corpus(cfg, "val") != train[:3]
    world = ShapesWorld(cfg.shapes)
    sample = world.sample("train", 3)
    assert train[3] == sample_document(sample)
    lines = train[3].splitlines()
    assert lines[:2] == [sample.caption, sample.instruction]
    assert lines[2] == f"USER: {sample.qa[0].question} ASSISTANT: {sample.qa[0].answer}"
    other_seed = CorpusConfig(train_samples=5, val_samples=3, shapes=ShapesConfig(image_size=32, seed=1))
    assert build_corpus(other_seed, "train") != train
    with pytest.raises(ValueError, match="corpus split 'test' is unknown"):
        build_corpus(cfg, "test")


def test_encode_corpus_word_splits_keep_text_and_train_more_rows(corpus, text_tokenizer):
    plain = encode_corpus(corpus, text_tokenizer)
    expected = [i for doc in corpus for i in [*text_tokenizer(doc)["input_ids"], text_tokenizer.eos_token_id]]
    assert plain.tolist() == expected
    split = encode_corpus(corpus, text_tokenizer, split_word_rate=0.3, seed=0)
    assert torch.equal(split, encode_corpus(corpus, text_tokenizer, split_word_rate=0.3, seed=0))
    assert not torch.equal(split, encode_corpus(corpus, text_tokenizer, split_word_rate=0.3, seed=1))
    assert text_tokenizer.decode(split, skip_special_tokens=True) == "".join(corpus)  # same text, other pieces
    assert len(split.unique()) > 2 * len(plain.unique())
    assert text_tokenizer.convert_tokens_to_ids("Ġ") not in split.tolist()  # a space stays on its word
    with pytest.raises(ValueError, match="contains special token text"):
        encode_corpus([f"a {IMAGE_PLACEHOLDER}"], text_tokenizer)


def test_packed_windows_are_stream_slices_in_a_seeded_order():
    stream = torch.arange(100)
    data = PackedWindows(stream, seq_len=8, seed=3)
    first, position = data.next_batch(DataPosition(), 4)
    assert first.shape == (4, 9)
    assert torch.equal(first, first[:, :1] + torch.arange(9))  # each row is a contiguous slice
    again, _ = PackedWindows(stream, seq_len=8, seed=3).next_batch(DataPosition(), 4)
    assert torch.equal(first, again)
    second, _ = PackedWindows(stream, seq_len=8, seed=3).next_batch(position, 4)  # resumes mid-epoch
    assert not set(first[:, 0].tolist()) & set(second[:, 0].tolist())
    _, rolled = data.next_batch(DataPosition(0, 10), 4)  # too few left in epoch 0: skip to epoch 1
    assert rolled == DataPosition(1, 4)
    with pytest.raises(UserError, match="fewer than one batch"):
        data.next_batch(DataPosition(), 64)


# -------------------------------------------------------------------------------------------- optim


def test_optimizer_groups_follow_the_config(text_tokenizer):
    model = build_model(TINY_MODEL, text_tokenizer)
    cfg = LMOptimConfig(lr=1e-3, weight_decay=0.05, betas=(0.8, 0.9), eps=1e-6)
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in groups.values())
    decayed = {id(p) for p in groups["decay"]["params"]}
    embedding = model.get_input_embeddings().weight
    for name, p in model.named_parameters():
        should_decay = p.ndim >= 2 and p is not embedding
        assert (id(p) in decayed) == should_decay, name
    assert id(model.lm_head.weight) in decayed
    with_embedding = build_optimizer(model, LMOptimConfig(decay_embeddings=True)).param_groups[0]["params"]
    assert any(p is embedding for p in with_embedding)


def test_schedule_warms_up_then_decays_to_the_floor():
    schedule = WarmupCosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55)  # half-way through the cosine
    assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)


def test_loss_falls_when_overfitting_one_batch(corpus, text_tokenizer):
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, text_tokenizer)
    optimizer = build_optimizer(model, LMOptimConfig(lr=1e-2, weight_decay=0.0))
    windows = encode_corpus(corpus[:2], text_tokenizer)[: 2 * 33].reshape(2, 33)
    with torch.no_grad():
        first = float(lm_loss(model, windows))
    assert first == pytest.approx(math.log(len(text_tokenizer)), rel=0.05)  # uniform guess at init
    for _ in range(40):
        loss = lm_loss(model, windows)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        assert float(lm_loss(model, windows)) < 0.5


# -------------------------------------------------------------------------------------------- train


def test_train_lm_saves_a_model_that_reloads_with_identical_logits(run, text_tokenizer):
    cfg, out_dir, path = run
    assert path == out_dir / "model"
    model = AutoModelForCausalLM.from_pretrained(path)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(reloaded_tokenizer)
    assert not model.config.tie_word_embeddings
    assert set(reloaded_tokenizer.convert_tokens_to_ids(list(MULTIMODAL_TOKENS))) <= set(
        reloaded_tokenizer.all_special_ids
    )

    # The saved weights are the last checkpoint's, and the saved config rebuilds the same architecture.
    last = CheckpointManager(out_dir / "checkpoints").load()
    assert last.step == 4
    rebuilt = build_model(cfg.model, reloaded_tokenizer)
    rebuilt.load_state_dict(last.tensors["model"])
    input_ids = reloaded_tokenizer("A large blue star on the left.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, rebuilt(input_ids).logits, rtol=0, atol=0)

    rows = read_log(out_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"val/loss", "val/ppl"} <= set(rows[1]) and "val/loss" not in rows[0]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["val_loss"] == rows[-1]["val/loss"] and metrics["vocab_size"] == len(reloaded_tokenizer)
    assert (out_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = load_config(LMTrainConfig, path / "lm_config.yaml")
    assert saved.model == cfg.model and saved.train.out_dir == out_dir


def test_resume_continues_exactly(run, tmp_path):
    cfg, out_dir, _ = run
    # Simulate a run that died after step 3: its latest checkpoint is step 2.
    crashed = tmp_path / "crashed"
    shutil.copytree(out_dir, crashed)
    atomic_write_json(crashed / "checkpoints" / "latest.json", {"name": "step-00000002", "step": 2})
    path = train_lm(cfg, crashed, resume=True)

    uninterrupted, resumed = read_log(out_dir), read_log(crashed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert a["train/loss"] == b["train/loss"] and a.get("val/loss") == b.get("val/loss"), a["step"]
    a = AutoModelForCausalLM.from_pretrained(out_dir / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_reads_a_checkpoint_written_before_the_shared_training_loop(run, tmp_path):
    """Stage-0 checkpoints before runtime/training_loop.py named the windows consumed `index`, not `batch`."""
    cfg, out_dir, _ = run
    old = tmp_path / "old"
    shutil.copytree(out_dir, old)
    atomic_write_json(old / "checkpoints" / "latest.json", {"name": "step-00000002", "step": 2})
    state_file = old / "checkpoints" / "step-00000002" / "state.json"
    state = json.loads(state_file.read_text())
    state["data"] = {"epoch": state["data"]["epoch"], "index": state["data"].pop("batch")}
    state_file.write_text(json.dumps(state))
    train_lm(cfg, old, resume=True)
    assert [r["train/loss"] for r in read_log(old)] == [r["train/loss"] for r in read_log(out_dir)]


def test_train_lm_refuses_to_overwrite_or_resume_with_changed_numbers(run):
    cfg, out_dir, _ = run
    with pytest.raises(UserError, match="already holds checkpoints"):
        train_lm(cfg, out_dir)
    changed = load_config(LMTrainConfig, overrides=[*TINY, "optim.lr=0.5"])
    with pytest.raises(UserError, match=r"lm_config\.yaml: optim\.lr 0\.01 -> 0\.5; resume with the run's settings"):
        train_lm(changed, out_dir, resume=True)


# ------------------------------------------------------------------------------------------- config


def test_preset_loads_and_invalid_values_name_the_key():
    preset = load_config(LMTrainConfig, "configs/lm/tiny.yaml")
    assert preset.model.tie_word_embeddings is False and preset.train.seq_len <= preset.model.max_position_embeddings
    with pytest.raises(ConfigError, match="key 'model.hidden_size' = 0 is out of range"):
        load_config(LMTrainConfig, overrides=["model.hidden_size=0"])
    with pytest.raises(ConfigError, match="model: num_attention_heads=3 must divide hidden_size=128"):
        load_config(LMTrainConfig, overrides=["model.num_attention_heads=3"])
    with pytest.raises(ConfigError, match="train.seq_len=512 exceeds model.max_position_embeddings=256"):
        load_config(LMTrainConfig, overrides=["train.seq_len=512"])
    with pytest.raises(ConfigError, match="did you mean 'train.steps'"):
        load_config(LMTrainConfig, overrides=["train.stpes=3"])
    with pytest.raises(ConfigError, match="key 'train.mixed_precision' must be one of"):
        load_config(LMTrainConfig, overrides=["train.mixed_precision=fp8"])


# ------------------------------------------------------------------------------------------ inspect


def test_embedding_structure_report_finds_planted_groups(text_tokenizer, tmp_path):
    model = build_model(TINY_MODEL, text_tokenizer)
    groups = {"colour": ("red", "blue", "green"), "shape": ("circle", "square", "star"), "none": ("zzzq",)}
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        for k, words in enumerate(groups.values()):
            for word in words:
                ids = text_tokenizer.encode(" " + word, add_special_tokens=False)
                if len(ids) == 1:  # each group gets its own direction, plus a little noise
                    weight[ids[0]] = 5.0 * torch.nn.functional.one_hot(torch.tensor(k), 32) + 0.1 * weight[ids[0]]
    model.save_pretrained(tmp_path)
    text_tokenizer.save_pretrained(tmp_path)
    report = embedding_structure_report(tmp_path, groups)
    assert report["skipped"] == ["zzzq"]
    assert report["nn_same_group"] == 1.0 and report["nn_same_group_chance"] == pytest.approx(0.4)
    assert report["within_cosine"] > 0.9 and abs(report["across_cosine"]) < 0.1
    assert report["neighbours"]["red"][:2] in ([" blue", " green"], [" green", " blue"])

    random_report = embedding_structure_report(tmp_path, {"a": ("top", "left", "small"), "b": ("one", "two", "zero")})
    assert random_report["within_cosine"] < 0.5  # untouched rows: no planted structure
    with pytest.raises(ValueError, match="need two groups"):
        embedding_structure_report(tmp_path, {"colour": ("red", "blue")})
