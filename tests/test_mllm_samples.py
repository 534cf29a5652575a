"""Stage-2 samples: templates, labels on assistant turns only, decompression order, skips, collation."""

from __future__ import annotations

import random
import re

import pytest
import torch

from unicode_mllm.constants import IGNORE_INDEX, IMAGE_END, IMAGE_PLACEHOLDER_ID, IMAGE_START
from unicode_mllm.data.conversation import CONVERSATION_TEMPLATES, Turn, get_template
from unicode_mllm.data.mllm_samples import (
    MLLMCollator,
    MLLMSampleBuilder,
    SampleError,
    SkipCounter,
)
from unicode_mllm.data.record_samples import build_record_samples, draw_vqa_turns
from unicode_mllm.data.shapes import ShapesConfig, ShapesWorld
from unicode_mllm.errors import UserError
from unicode_mllm.stages.lm.config import TextTokenizerConfig
from unicode_mllm.stages.lm.corpus import sample_document
from unicode_mllm.stages.lm.text_tokenizer import train_text_tokenizer
from unicode_mllm.token_layout import (
    grid_to_sequence,
    segments_to_grid,
    sequence_to_grid,
    split_into_segments,
)

CODE_SHAPE = (2, 4, 2)  # h, w, d: 8 read slots (aggregated), 16 written ids


@pytest.fixture(scope="module")
def world_samples():
    return list(ShapesWorld(ShapesConfig(image_size=32)).iter_split("train", 20))


@pytest.fixture(scope="module")
def text_tokenizer(world_samples):
    """The project's byte-level BPE, trained on the corpus documents of 20 shapes samples."""
    return train_text_tokenizer([sample_document(s) for s in world_samples], TextTokenizerConfig(vocab_size=300))


def image_ids(offset: int = 100) -> torch.Tensor:
    """(h, w, d) distinct LLM token ids, so that their order can be read back."""
    return torch.arange(offset, offset + 16).reshape(CODE_SHAPE)


def labelled_runs(labels: torch.Tensor) -> list[torch.Tensor]:
    """The labelled ids, one tensor per contiguous labelled run (one per assistant turn)."""
    mask = labels != IGNORE_INDEX
    edges = torch.nn.functional.pad(mask.long(), (1, 1)).diff()
    starts, ends = (edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0]
    return [labels[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def test_plain_template_reproduces_the_lm_corpus_format(text_tokenizer, world_samples):
    sample = world_samples[0]
    builder = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, template="plain")
    built = builder.conversation([Turn(q.question, q.answer) for q in sample.qa], [], "qa")
    qa_lines = sample_document(sample).split("\n")[2:]  # the corpus document's USER/ASSISTANT lines
    expected = text_tokenizer("\n".join(qa_lines))["input_ids"] + [text_tokenizer.eos_token_id]
    assert built.input_ids.tolist() == expected  # <s> ... </s>, token for token what the LM read in stage 0


@pytest.mark.parametrize(("template", "turn_end"), [("plain", "\n"), ("vicuna_v1", "</s>")])
def test_labels_cover_exactly_the_assistant_turns(text_tokenizer, template, turn_end):
    builder = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, template=template)
    qa = [("What colour is the square?", "purple"), ("How many objects are there?", "two")]
    sample = builder.vqa(image_ids(), qa, "s0")
    runs = labelled_runs(sample.labels)
    decoded = [text_tokenizer.decode(r.tolist()) for r in runs]
    assert decoded == [" purple" + turn_end, " two</s>"]
    # Everything else is IGNORE_INDEX: the system line, the questions, the roles, the image read.
    assert int((sample.labels != IGNORE_INDEX).sum()) == sum(len(r) for r in runs)
    unlabelled = text_tokenizer.decode(sample.input_ids[(sample.labels == IGNORE_INDEX) & (sample.input_ids >= 0)])
    assert "What colour is the square?" in unlabelled and "purple" not in unlabelled
    # The image the LLM reads: <img> + h*w placeholder slots + </img>, never labelled.
    slots = (sample.input_ids == IMAGE_PLACEHOLDER_ID).nonzero()[:, 0]
    assert len(slots) == 8 and torch.equal(slots, torch.arange(int(slots[0]), int(slots[0]) + 8))
    assert text_tokenizer.convert_ids_to_tokens(int(sample.input_ids[slots[0] - 1])) == IMAGE_START
    assert text_tokenizer.convert_ids_to_tokens(int(sample.input_ids[slots[-1] + 1])) == IMAGE_END
    assert torch.equal(sample.image_token_ids, image_ids()[None])


def test_interleaved_reading_reserves_h_w_d_slots(text_tokenizer):
    builder = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, reading="interleaved")
    sample = builder.caption(image_ids(), "A red circle.")
    assert int((sample.input_ids == IMAGE_PLACEHOLDER_ID).sum()) == 16 == builder.tokens_per_image


def test_decompression_targets_are_h_w_d_ids_in_raster_depth_first_order(text_tokenizer):
    grid = image_ids()
    builder = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, num_segments=2)
    sample = builder.decompression(grid, "d0")
    is_code = (sample.labels >= 100) & (sample.labels < 116)
    targets = sample.labels[is_code]
    assert len(targets) == 2 * 4 * 2
    assert torch.equal(targets, grid.reshape(-1))
    assert int(targets[2]) == int(grid[0, 1, 0]) and int(targets[1]) == int(grid[0, 0, 1])  # depth-first
    # The compact image is read once (h*w slots) in the first user turn.
    assert int((sample.input_ids == IMAGE_PLACEHOLDER_ID).sum()) == 8
    runs = labelled_runs(sample.labels)
    assert len(runs) == 2  # T = 2 assistant turns
    img_start = text_tokenizer.convert_tokens_to_ids(IMAGE_START)
    img_end = text_tokenizer.convert_tokens_to_ids(IMAGE_END)
    assert (img_start in runs[0].tolist(), img_end in runs[0].tolist()) == (True, False)
    assert (img_start in runs[1].tolist(), img_end in runs[1].tolist()) == (False, True)
    segments = [r[(r >= 100) & (r < 116)] for r in runs]
    assert [len(s) for s in segments] == [8, 8]
    assert torch.equal(segments_to_grid(segments, CODE_SHAPE), grid)  # the conversation round-trips to the grid
    assert "Write part 2 of 2 of the image." in text_tokenizer.decode(sample.input_ids[sample.input_ids >= 0])


def test_default_segments_are_one_grid_row_each(text_tokenizer):
    sample = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE).decompression(image_ids())
    assert len(labelled_runs(sample.labels)) == CODE_SHAPE[0]


def test_segment_helpers_round_trip_and_check_sizes():
    grid = torch.randint(0, 50, (4, 6, 3))
    for t in (1, 2, 3, 4, 6, 8, 12, 24):
        segments = split_into_segments(grid, t)
        assert len(segments) == t and all(s.numel() == 72 // t for s in segments)
        assert torch.equal(segments_to_grid(segments, (4, 6, 3)), grid)
    assert torch.equal(sequence_to_grid(grid_to_sequence(grid), (4, 6, 3)), grid)
    with pytest.raises(ValueError, match=r"T=5 must divide the h\*w = 4\*6 = 24 positions"):
        split_into_segments(grid, 5)
    with pytest.raises(ValueError, match=r"needs h\*w\*d = 4\*6\*3 = 72 ids, got 71"):
        segments_to_grid([grid.reshape(-1)[:71]], (4, 6, 3))


def test_a_too_long_sample_is_reported_not_truncated(text_tokenizer):
    qa = [("What colour is the square?", "purple")] * 6
    short = len(MLLMSampleBuilder(text_tokenizer, CODE_SHAPE).caption(image_ids(), "A red circle."))
    assert short <= 50 < len(MLLMSampleBuilder(text_tokenizer, CODE_SHAPE).vqa(image_ids(), qa))
    lax = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, max_length=50, strict=False)
    assert lax.vqa(image_ids(), qa, "long") is None
    assert lax.caption(image_ids(), "A red circle.", "short") is not None
    assert lax.skips.skipped == {"too long": 1} and lax.skips.built == 1
    assert lax.skips.summary() == "skipped 1 of 2 samples (50.00%): 1 too long"
    assert lax.skips.to_delta().samples == {"too long": 1}
    strict = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, max_length=50)
    with pytest.raises(SampleError, match=r"too long: sample long: vqa sample has \d+ tokens, max_length is 50"):
        strict.vqa(image_ids(), qa, "long")
    counter = SkipCounter(strict=False, max_skip_fraction=0.25)
    capped = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, max_length=50, strict=False, skips=counter)
    capped.vqa(image_ids(), qa, "long")
    with pytest.raises(UserError, match="exceeds data.max_skip_fraction=0.25"):
        counter.check()


def test_truncation_is_explicit_counted_and_never_cuts_an_image(text_tokenizer):
    qa = [("What colour is the square?", "purple")] * 6
    builder = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, max_length=50, overflow="truncate")
    sample = builder.vqa(image_ids(), qa, "long")
    assert len(sample) == 50 and builder.skips.truncated == 1 and "1 truncated" in builder.skips.summary()
    assert bool((sample.labels != IGNORE_INDEX).any())
    with pytest.raises(SampleError, match=r"would cut through the image span at tokens \d+-\d+"):
        MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, max_length=30, overflow="truncate").text_to_image(
            "Paint a red circle.", image_ids()
        )


def test_text_to_image_target_is_the_image_span_and_the_prompt_is_its_prefix(text_tokenizer):
    builder = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE)
    sample = builder.text_to_image("Paint a red circle in the center.", image_ids(), "t0")
    labelled = sample.labels[sample.labels != IGNORE_INDEX].tolist()
    img_start = text_tokenizer.convert_tokens_to_ids(IMAGE_START)
    img_end = text_tokenizer.convert_tokens_to_ids(IMAGE_END)
    start = labelled.index(img_start)
    assert labelled[start + 1 : start + 17] == image_ids().reshape(-1).tolist() and labelled[start + 17] == img_end
    assert sample.image_token_ids.shape == (0, *CODE_SHAPE)  # nothing is read
    prompt = builder.text_to_image_prompt("Paint a red circle in the center.")
    assert int(prompt[-1]) == img_start and torch.equal(sample.input_ids[: len(prompt)], prompt)


def test_cfg_drop_replaces_the_prompt_by_the_empty_one(text_tokenizer):
    always = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, cfg_drop_rate=1.0)
    dropped = always.text_to_image("Paint a red circle.", image_ids())
    assert dropped.task == "text_to_image_uncond"
    assert "red" not in text_tokenizer.decode(dropped.input_ids)
    unconditional = always.text_to_image_prompt("")
    assert torch.equal(dropped.input_ids[: len(unconditional)], unconditional)

    def tasks(seed: int) -> list[str]:
        builder = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, cfg_drop_rate=0.3, seed=seed)
        return [builder.text_to_image("Paint a red circle.", image_ids()).task for _ in range(40)]

    draws = [tasks(7), tasks(7)]
    assert draws[0] == draws[1]  # the seeded RNG replays the same drops
    assert 3 <= draws[0].count("text_to_image_uncond") <= 25


def test_missing_image_and_template_mismatch_are_counted_or_raised(text_tokenizer):
    lax = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE, strict=False)
    assert lax.vqa(None, [("What colour is the square?", "red")]) is None
    assert lax.caption(image_ids(), "A red circle.</s>") is None  # special-token text inside a message
    assert lax.caption(torch.zeros(2, 2, 2, dtype=torch.long), "A red circle.") is None  # wrong code shape
    assert lax.skips.skipped == {"missing image": 1, "template mismatch": 2}
    strict = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE)
    with pytest.raises(SampleError, match="missing image"):
        strict.text_to_image("Paint a red circle.", None)
    with pytest.raises(SampleError, match=r"special tokens \['</s>'\]"):
        strict.caption(image_ids(), "A red circle.</s>")


def test_shapes_record_gives_one_sample_per_task(text_tokenizer, world_samples):
    builder = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE)
    samples = build_record_samples(builder, world_samples[1].to_json(), image_ids())
    assert [s.task for s in samples] == ["vqa", "caption", "text_to_image", "decompression"]
    assert len(labelled_runs(samples[0].labels)) == len(world_samples[1].qa)
    assert builder.skips.built == 4


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_and_returns_attention_masks(text_tokenizer, side):
    builder = MLLMSampleBuilder(text_tokenizer, CODE_SHAPE)
    samples = [builder.caption(image_ids(), "A red circle."), builder.text_to_image("Paint it.", image_ids(200))]
    batch = MLLMCollator(text_tokenizer.pad_token_id, padding_side=side)(samples)
    lengths = [len(s) for s in samples]
    t = max(lengths)
    assert batch["input_ids"].shape == (2, t) and batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["images_per_sample"].tolist() == [1, 0] and batch["image_token_ids"].shape == (1, *CODE_SHAPE)
    short = 0 if lengths[0] < lengths[1] else 1
    n = lengths[short]
    cols = slice(0, n) if side == "right" else slice(t - n, t)
    assert torch.equal(batch["input_ids"][short, cols], samples[short].input_ids)
    assert torch.equal(batch["labels"][short, cols], samples[short].labels)
    assert bool((batch["labels"][short][batch["attention_mask"][short] == 0] == IGNORE_INDEX).all())
    assert bool((batch["input_ids"][short][batch["attention_mask"][short] == 0] == text_tokenizer.pad_token_id).all())
    with pytest.raises(TypeError, match="drop skipped samples before collating"):
        MLLMCollator(0)([samples[0], None])


def test_template_lookup_lists_the_names():
    assert get_template("vicuna_v1").system.startswith("A chat between")
    assert {"plain", "vicuna_v1"} <= set(CONVERSATION_TEMPLATES)
    with pytest.raises(UserError, match=r"template 'llava' is unknown; choose one of \['plain', 'vicuna_v1'"):
        get_template("llava")


def test_builder_refuses_a_text_tokenizer_without_the_sentinels(world_samples):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        [s.caption for s in world_samples], trainers.BpeTrainer(special_tokens=["<unk>", "</s>"], show_progress=False)
    )
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<unk>")
    with pytest.raises(UserError, match="run add_multimodal_tokens first"):
        MLLMSampleBuilder(bare, CODE_SHAPE)


def test_vqa_turn_draw_never_keeps_an_answer_named_by_an_earlier_question():
    leaky = [("What colour is the square?", "purple"), ("What shape is the purple object?", "square")]
    for seed in range(20):
        kept = draw_vqa_turns(leaky, 2, random.Random(seed))
        assert len(kept) == 1  # whichever comes first, the other is answerable from it
    world = ShapesWorld(ShapesConfig(image_size=32))
    lengths = []
    for index in range(50):
        qa = [(q.question, q.answer) for q in world.sample("train", index).qa]
        kept = draw_vqa_turns(qa, 4, random.Random(index))
        lengths.append(len(kept))
        assert kept == draw_vqa_turns(qa, 4, random.Random(index))  # seeded
        assert len(set(kept)) == len(kept) and set(kept) <= set(qa)
        for t, (_, answer) in enumerate(kept):
            for question, _ in kept[:t]:
                assert re.search(rf"\b{re.escape(answer)}\b", question) is None, (question, answer)
    assert min(lengths) >= 2 and sum(lengths) / len(lengths) > 3.5  # the filter rarely starves a conversation
