"""Inference on the saved tiny random UniCodeMLLM: sampling, the constrained image span, guidance, the KV
cache, left-padded batches, answers with eos and streaming, the chat session, and the CLI commands."""

from __future__ import annotations

import io
import json
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from unicode_mllm.cli import main
from unicode_mllm.data.image_io import pil_to_tensor
from unicode_mllm.errors import UserError
from unicode_mllm.generation import (
    OUTSIDE,
    ChatSession,
    ChatSettings,
    ImageSpanConstraint,
    SamplingSettings,
    answer,
    answer_questions,
    choose_next_tokens,
    filter_logits,
    generate_answers,
    generate_images,
    images_to_token_ids,
    mix_guidance,
    prompt_builder,
    question_prompts,
    reply_stop_strings,
    sample_from_probs,
    stream_answer,
    uniform_draws,
)
from unicode_mllm.generation.chat_repl import parse_chat_line
from unicode_mllm.model import UniCodeMLLM

# transformers deprecations (e.g. the KV-cache argument `past_key_values` -> `cache`, removed in 5.40) must
# fail here, not surface in users' terminals.
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

PROMPTS = ["a red circle at the top left", "a small blue square", "a green star in the center and a red triangle"]
QUESTIONS = ["what colour is the circle", "where", "how many objects are there in the picture at the top"]


@pytest.fixture(scope="module")
def model(tiny_mllm_dir) -> UniCodeMLLM:
    return UniCodeMLLM.from_pretrained(tiny_mllm_dir).eval()


def random_token_ids(model: UniCodeMLLM, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.visual_tokenizer.config.num_codes, (n, *model.code_shape), generator=gen)
    return model.visual_tokenizer.codes_to_token_ids(codes)  # (n, h, w, d) LLM token ids


@contextmanager
def logit_bias(model: UniCodeMLLM, bias: dict[int, float]):
    """Add `bias[id]` to the LM's logits (a forward hook on the output layer) while inside the block."""
    vocab = model.lm.get_output_embeddings().weight.shape[0]
    add = torch.zeros(vocab)
    for i, value in bias.items():
        add[i] = value
    handle = model.lm.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out + add.to(out))
    try:
        yield
    finally:
        handle.remove()


def non_code_ids(model: UniCodeMLLM) -> list[int]:
    vocab = model.lm.get_output_embeddings().weight.shape[0]
    is_code = model.visual_tokenizer.is_code_token_id(torch.arange(vocab))
    return (~is_code).nonzero()[:, 0].tolist()


# ----- sampling ------------------------------------------------------------------------------------


def test_filter_logits_keeps_the_top_k_and_the_top_p_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1)
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # ~[.64, .24, .09, .03, .01]
    kept = torch.isfinite(filter_logits(logits, top_p=float(probs[0] + probs[1]) - 1e-4))
    assert kept.tolist() == [[True, True, False, False, False]]  # the smallest prefix with mass >= p
    kept = torch.isfinite(filter_logits(logits, top_p=0.01))
    assert kept.tolist() == [[True, False, False, False, False]]  # the best token always survives
    banned = logits.clone()
    banned[0, 0] = float("-inf")
    kept = torch.isfinite(filter_logits(banned, top_k=2, top_p=0.5))
    assert kept.tolist() == [[False, True, False, False, False]]


def test_inverse_cdf_sampling_follows_the_probabilities_and_skips_zero_mass():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    draws = uniform_draws([123], 20000)[0]  # (20000,)
    ids = sample_from_probs(probs.expand(len(draws), -1), draws)
    freq = torch.bincount(ids, minlength=6).double() / len(draws)
    torch.testing.assert_close(freq, probs.double(), atol=0.02, rtol=0)
    assert int(freq[0]) == 0 and int(freq[2]) == 0 and int(freq[5]) == 0
    edge = sample_from_probs(probs[None].expand(2, -1), torch.tensor([0.0, 1.0 - 1e-17]))
    assert edge.tolist() == [1, 4]  # u = 0 and u -> 1 still land on tokens with mass


def test_sampling_settings_refuse_bad_values():
    with pytest.raises(UserError, match="temperature must be >= 0"):
        SamplingSettings(temperature=-1)
    with pytest.raises(UserError, match=r"top_p must lie in \(0, 1\]"):
        SamplingSettings(top_p=0.0)
    with pytest.raises(ValueError, match="row 1 has no allowed next token"):
        choose_next_tokens(torch.tensor([[0.0, 1.0], [float("-inf")] * 2]), SamplingSettings(0.0), None)


def test_guidance_at_scale_one_is_the_conditional_logits_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 50, generator=gen) * 7, torch.randn(3, 50, generator=gen) * 7
    assert torch.equal(mix_guidance(torch.cat([cond, uncond]), 1.0), cond)
    torch.testing.assert_close(mix_guidance(torch.cat([cond, uncond]), 3.0), uncond + 3.0 * (cond - uncond))


# ----- the image-span constraint -------------------------------------------------------------------


def test_constraint_state_machine_opens_fills_and_closes_a_span():
    codes = torch.tensor([3, 4, 5])
    constraint = ImageSpanConstraint(
        codes,
        image_start_id=7,
        image_end_id=8,
        span_length=2,
        vocab_size=10,
        banned_in_text=[0],
        allow_image_start=True,
    )
    state = constraint.initial_state(1, inside=False)
    allowed = constraint.allowed(state)[0]
    assert not allowed[0] and not allowed[8] and allowed[7] and allowed[3]  # text: <img> yes, </img> and 0 no
    for token, expected_state in [(7, 0), (4, 1), (5, 2), (8, OUTSIDE)]:
        if expected_state == OUTSIDE:
            assert constraint.allowed(state)[0].nonzero()[:, 0].tolist() == [8]  # full span: </img> only
        elif expected_state >= 1:
            assert constraint.allowed(state)[0].nonzero()[:, 0].tolist() == [3, 4, 5]  # inside: codes only
        state = constraint.advance(state, torch.tensor([token]))
        assert int(state[0]) == expected_state
    with pytest.raises(ValueError, match="forbids"):
        constraint.advance(constraint.initial_state(1, inside=True), torch.tensor([8]))  # </img> before any code
    closed = ImageSpanConstraint(codes, image_start_id=7, image_end_id=8, span_length=2, vocab_size=10)
    assert not closed.allowed(closed.initial_state(1, inside=False))[0, 7]  # text may not open an image


def test_generated_spans_hold_exactly_hwd_codes_even_when_the_lm_prefers_other_ids(model):
    bias = {i: 30.0 for i in non_code_ids(model)}  # eos, </img>, <img>, pad, ... all far above every code
    n = model.num_write_tokens
    with logit_bias(model, bias):
        prompt = prompt_builder(model).text_to_image_prompt(PROMPTS[0])
        raw = model(prompt[None]).logits[0, -1]
        assert not bool(model.visual_tokenizer.is_code_token_id(raw.argmax())), "the bias must tempt the LM"
        for temperature in (0.0, 1.0):
            out = generate_images(model, PROMPTS[:2], num_images_per_prompt=2, temperature=temperature, seed=3)
            assert out.sequences.shape == (4, n + 1)
            assert bool(model.visual_tokenizer.is_code_token_id(out.sequences[:, :n]).all())
            assert out.sequences[:, n].tolist() == [model.token_ids.image_end] * 4
    assert out.token_ids.shape == (4, *model.code_shape)
    assert out.pixel_values.shape == (4, 3, 32, 32) and float(out.pixel_values.abs().max()) <= 1.0
    assert [img.size for img in out.images] == [(32, 32)] * 4


# ----- seeds, guidance, cache, batching ------------------------------------------------------------


def test_seeded_generation_is_reproducible_batch_independent_and_seed_dependent(model):
    kwargs = dict(num_images_per_prompt=2, top_k=50, decode=False)
    a = generate_images(model, PROMPTS[:2], seed=11, batch_size=4, **kwargs)
    b = generate_images(model, PROMPTS[:2], seed=11, batch_size=1, **kwargs)
    c = generate_images(model, PROMPTS[:2], seed=12, batch_size=4, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert a.seeds == b.seeds and len(set(a.seeds)) == 4
    assert not torch.equal(a.sequences, c.sequences)
    assert not torch.equal(a.sequences[0], a.sequences[1])  # two images of one prompt differ


def test_cfg_scale_one_with_the_unconditional_rows_equals_plain_sampling(model):
    plain = generate_images(model, PROMPTS, seed=5, top_p=0.9, use_cfg=False, decode=False)
    both = generate_images(model, PROMPTS, seed=5, top_p=0.9, cfg_scale=1.0, use_cfg=True, decode=False)
    assert torch.equal(plain.sequences, both.sequences)
    guided = generate_images(model, PROMPTS, seed=5, top_p=0.9, cfg_scale=4.0, decode=False)
    assert not torch.equal(plain.sequences, guided.sequences)


def test_depth_temperatures_apply_per_code_depth(model):
    d = model.code_shape[2]
    plain = generate_images(model, PROMPTS[:2], seed=7, temperature=0.8, top_k=40, decode=False)
    same = generate_images(model, PROMPTS[:2], seed=7, top_k=40, depth_temperatures=[0.8] * d, decode=False)
    assert torch.equal(plain.sequences, same.sequences)  # one value per depth = that temperature everywhere
    greedy = generate_images(model, PROMPTS[:2], temperature=0.0, decode=False)
    all_zero = generate_images(model, PROMPTS[:2], seed=7, depth_temperatures=[0.0] * d, decode=False)
    assert torch.equal(greedy.sequences, all_zero.sequences) and all_zero.seed is None
    # Depth 1 greedy, the others sampled hot: every depth-1 code is the argmax over codes given its prefix.
    temps = [5.0] * d
    temps[1] = 0.0
    mixed = generate_images(model, PROMPTS[:1], seed=7, depth_temperatures=temps, decode=False)
    assert mixed.settings["depth_temperatures"] == tuple(temps)
    builder = prompt_builder(model)
    prompt = builder.text_to_image_prompt(PROMPTS[0])
    is_code = model.visual_tokenizer.is_code_token_id(torch.arange(model.lm.get_output_embeddings().weight.shape[0]))
    codes = mixed.sequences[0, :-1]
    with torch.no_grad():
        for step in range(1, model.num_write_tokens, d):  # the depth-1 code of every position
            logits = model(torch.cat([prompt, codes[:step]])[None]).logits[0, -1]
            assert int(codes[step]) == int(logits.masked_fill(~is_code, float("-inf")).argmax())
    hot = generate_images(model, PROMPTS[:1], seed=7, temperature=5.0, decode=False)
    assert not torch.equal(hot.sequences, mixed.sequences)
    with pytest.raises(UserError, match=f"this model writes {d} codes per position: give {d}"):
        generate_images(model, PROMPTS[:1], depth_temperatures=[1.0] * (d + 1), decode=False)
    with pytest.raises(UserError, match="depth temperatures must be one or more values >= 0"):
        SamplingSettings(depth_temperatures=(1.0, -0.5))


def reference_guided_greedy(model: UniCodeMLLM, prompt: str, scale: float) -> list[int]:
    """Slow and obvious: full forwards, no cache, no padding, cond and uncond run apart; LlamaGen's mix."""
    builder = prompt_builder(model)
    cond, uncond = builder.text_to_image_prompt(prompt), builder.text_to_image_prompt("")
    is_code = model.visual_tokenizer.is_code_token_id(torch.arange(model.lm.get_output_embeddings().weight.shape[0]))
    out: list[int] = []
    with torch.no_grad():
        for _ in range(model.num_write_tokens):
            tail = torch.tensor(out, dtype=torch.long)
            c = model(torch.cat([cond, tail])[None]).logits[0, -1]
            u = model(torch.cat([uncond, tail])[None]).logits[0, -1]
            out.append(int((u + scale * (c - u)).masked_fill(~is_code, float("-inf")).argmax()))
    return out


def test_guided_greedy_decoding_matches_a_slow_reference(model):
    out = generate_images(model, PROMPTS[:2], temperature=0.0, cfg_scale=3.0, decode=False)
    for row, prompt in enumerate(PROMPTS[:2]):
        assert out.sequences[row, :-1].tolist() == reference_guided_greedy(model, prompt, 3.0)


def test_kv_cache_decoding_gives_the_ids_of_full_recomputation(model):
    for cfg_scale in (1.0, 2.0):
        cached = generate_images(model, PROMPTS, temperature=0.0, cfg_scale=cfg_scale, decode=False)
        full = generate_images(model, PROMPTS, temperature=0.0, cfg_scale=cfg_scale, use_cache=False, decode=False)
        assert torch.equal(cached.sequences, full.sequences)
    images = [None, *random_token_ids(model, 2)]
    prompts = question_prompts(model, images, QUESTIONS)
    cached = generate_answers(model, prompts, max_new_tokens=12)
    full = generate_answers(model, prompts, max_new_tokens=12, use_cache=False)
    assert [a.token_ids.tolist() for a in cached] == [a.token_ids.tolist() for a in full]


def test_left_padded_batches_give_the_greedy_ids_of_one_by_one_decoding(model):
    together = generate_images(model, PROMPTS, temperature=0.0, cfg_scale=2.0, decode=False)
    for row, prompt in enumerate(PROMPTS):
        alone = generate_images(model, [prompt], temperature=0.0, cfg_scale=2.0, decode=False)
        assert torch.equal(together.sequences[row], alone.sequences[0])
    images = [random_token_ids(model, 1, seed=1)[0], None, random_token_ids(model, 1, seed=2)[0]]
    prompts = question_prompts(model, images, QUESTIONS)
    assert len({len(p) for p in prompts}) == 3  # really padded
    batched = generate_answers(model, prompts, max_new_tokens=10)
    for row, prompt in enumerate(prompts):
        (alone,) = generate_answers(model, [prompt], max_new_tokens=10)
        assert batched[row].token_ids.tolist() == alone.token_ids.tolist()
        assert batched[row].text == alone.text


def test_incremental_decoder_logits_of_a_padded_row_match_the_row_alone(model):
    from unicode_mllm.data.mllm_samples import MLLMCollator
    from unicode_mllm.generation import IncrementalDecoder

    prompts = question_prompts(model, [random_token_ids(model, 1)[0], None], QUESTIONS[1:])
    assert len(prompts[0]) != len(prompts[1])
    fed = torch.tensor([[20, 21], [30, 31], [40, 41]])  # (steps, b) ids fed after the prompt

    def run_decoder(samples, rows):
        batch = MLLMCollator(model.token_ids.pad, padding_side="left")(samples)
        spliced = model.build_inputs(batch["input_ids"], batch["attention_mask"], batch["image_token_ids"])
        decoder = IncrementalDecoder(model.lm)
        with torch.no_grad():
            return [decoder.prefill(spliced.inputs_embeds, spliced.attention_mask)] + [
                decoder.step(ids[rows]) for ids in fed
            ]

    together = run_decoder(prompts, slice(None))
    for row, prompt in enumerate(prompts):
        alone = run_decoder([prompt], slice(row, row + 1))
        for step, (b, a) in enumerate(zip(together, alone, strict=True)):
            torch.testing.assert_close(b[row], a[0], atol=1e-5, rtol=1e-4, msg=f"row {row} step {step}")


def test_prompt_longer_than_the_lm_positions_is_one_user_error(model):
    long_prompt = " ".join(["red circle"] * 300)
    with pytest.raises(UserError, match="at most 512 positions"):
        generate_images(model, [long_prompt])
    with pytest.raises(UserError, match="at most 512 positions"):
        answer(model, None, " ".join(["where"] * 600))
    with pytest.raises(UserError, match="empty"):
        generate_images(model, ["  "])


# ----- answers -------------------------------------------------------------------------------------


def test_answer_stops_at_eos_and_streams_exactly_the_text_it_returns(model):
    eos = model.token_ids.eos
    stop_at = [3, 5]
    calls = []

    def force_eos(logits: torch.Tensor, step: int) -> torch.Tensor:
        calls.append(step)
        logits = logits.clone()
        for row, at in enumerate(stop_at):
            if step == at:
                logits[row, eos] = 1e4
        return logits

    images = random_token_ids(model, 2)
    pieces: dict[int, list[str]] = {0: [], 1: []}
    answers = answer_questions(
        model,
        list(images),
        QUESTIONS[:2],
        max_new_tokens=20,
        temperature=1.0,
        seed=0,
        logits_processor=force_eos,
        stream=lambda i, piece: pieces[i].append(piece),
    )
    assert calls == list(range(max(stop_at) + 1))  # decoding ends once every row has ended
    for row, at in enumerate(stop_at):
        answer = answers[row]
        assert answer.finish_reason == "eos" and len(answer.token_ids) == at  # eos itself is not returned
        expected = model.text_tokenizer.decode(answer.token_ids, skip_special_tokens=True).strip()
        assert " ".join(answer.text.split()) == " ".join(expected.split())
        assert "".join(pieces[row]) == answer.text and len(pieces[row]) > 1


def test_answer_method_streams_and_returns_the_same_text(model, tmp_path):
    picture = Image.new("RGB", (48, 40), (200, 30, 30))  # another size: centre-cropped and resized
    streamed: dict[int, str] = {}
    texts = answer(
        model,
        [picture, None],
        QUESTIONS[:2],
        max_new_tokens=15,
        temperature=1.0,
        top_k=20,
        seed=4,
        stream=lambda i, p: streamed.__setitem__(i, streamed.get(i, "") + p),
    )
    assert len(texts) == 2 and all(texts) and streamed == {0: texts[0], 1: texts[1]}
    assert answer(model, [picture, None], QUESTIONS[:2], max_new_tokens=15, temperature=1.0, top_k=20, seed=4) == texts
    assert (
        "".join(stream_answer(model, picture, QUESTIONS[0], max_new_tokens=15))
        == answer(model, picture, QUESTIONS[0], max_new_tokens=15)[0]
    )


def test_a_stop_string_ends_the_answer_before_it(model):
    (full,) = answer_questions(model, None, [QUESTIONS[0]], max_new_tokens=12)
    word = full.text.split()[3]
    (cut,) = answer_questions(model, None, [QUESTIONS[0]], max_new_tokens=12, stop_strings=[" " + word])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(" " + word)].strip()
    assert reply_stop_strings("plain") == ("\n",) and reply_stop_strings("vicuna_v1") == ()


def test_text_answers_hold_no_image_ids_unless_allowed(model):
    ids = model.token_ids
    tempting = {ids.image_start: 40.0, ids.image_end: 39.0, ids.image_placeholder: 38.0, ids.pad: 37.0}
    with logit_bias(model, tempting):
        (text_only,) = answer_questions(model, None, [QUESTIONS[0]], max_new_tokens=8)
        assert not set(text_only.token_ids.tolist()) & set(tempting)
        n = model.num_write_tokens
        (with_image,) = answer_questions(model, None, [QUESTIONS[0]], max_new_tokens=n + 4, allow_images=True)
    generated = with_image.token_ids.tolist()
    assert generated[0] == ids.image_start and generated[n + 1] == ids.image_end
    assert bool(model.visual_tokenizer.is_code_token_id(torch.tensor(generated[1 : n + 1])).all())
    assert len(with_image.images) == 1 and with_image.images[0].shape == model.code_shape
    assert with_image.text.startswith("<image>")


def test_image_inputs_accept_pil_pixels_and_ids_and_refuse_bad_ones(model, tmp_path):
    picture = Image.new("RGB", (32, 32), (10, 200, 10))
    ids = random_token_ids(model, 1)[0]
    from_pil, from_pixels, from_ids, nothing = images_to_token_ids(model, [picture, pil_to_tensor(picture), ids, None])
    assert torch.equal(from_pil, from_pixels) and torch.equal(from_ids, ids) and nothing is None
    assert from_pil.shape == model.code_shape
    with pytest.raises(UserError, match=r"scale them to \[-1, 1\]"):
        images_to_token_ids(model, [pil_to_tensor(picture) * 127.5 + 127.5])
    with pytest.raises(UserError, match="not visual codes"):
        images_to_token_ids(model, [torch.full(model.code_shape, model.token_ids.eos)])
    garbage = tmp_path / "bad.png"
    garbage.write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match="not a readable image"):
        images_to_token_ids(model, [garbage])


# ----- chat ----------------------------------------------------------------------------------------


def test_chat_session_keeps_the_history_and_draws_into_it(model):
    session = ChatSession(model, ChatSettings(max_new_tokens=6, seed=1))
    session.attach_image(random_token_ids(model, 1)[0])
    first = session.ask(QUESTIONS[0])
    assert session.num_turns == 1 and len(session.images) == 1 and session.pending_image is None
    (again,) = answer_questions(model, [session.images[0]], [QUESTIONS[0]], max_new_tokens=6)
    assert first == again.text  # the first turn is exactly a one-question prompt
    drawing = session.draw("a red circle")
    assert drawing.token_ids.shape == (1, *model.code_shape) and drawing.images[0].size == (32, 32)
    written = session.turns[-1].assistant[0].token_ids
    assert torch.equal(written, drawing.token_ids[0].reshape(-1))
    session.ask("where")
    assert session.num_turns == 3
    session.reset()
    assert session.num_turns == 0 and session.images == []
    with pytest.raises(UserError, match="empty"):
        session.ask(" ")
    assert session.num_turns == 0


def test_chat_lines_parse_into_commands():
    assert parse_chat_line("  ") is None
    assert parse_chat_line("draw: a red circle").argument == "a red circle"
    assert parse_chat_line("/draw a star").kind == "draw"
    assert parse_chat_line("/image x.png").argument == "x.png"
    assert parse_chat_line("what is it?").kind == "ask"
    with pytest.raises(UserError, match="unknown command '/foo'"):
        parse_chat_line("/foo")


# ----- the command line ----------------------------------------------------------------------------


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def write_png(path, colour=(200, 30, 30), size=32):
    Image.new("RGB", (size, size), colour).save(path)
    return path


def test_cli_ask_streams_one_answer_and_pairs_several(capsys, tiny_mllm_dir, model, tmp_path):
    a, b = write_png(tmp_path / "a.png"), write_png(tmp_path / "b.png", (10, 10, 200))
    code, out, err = run(
        capsys,
        "ask",
        "--model",
        str(tiny_mllm_dir),
        "--image",
        str(a),
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
        "where",
    )
    assert code == 0, err
    assert out.strip() == answer(model, Image.open(a), "where", max_new_tokens=8)[0]
    code, out, err = run(
        capsys,
        *("ask", "--model", str(tiny_mllm_dir), "--device", "cpu", "--max-new-tokens", "5"),
        *("--image", str(a), "--question", "where", "--image", str(b), "--question", "what colour"),
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{a} | where -> ") and lines[1].startswith(f"{b} | what colour")


def test_cli_ask_reduce_answers_as_the_reduced_model(capsys, tiny_mllm_dir, tmp_path):
    """--reduce overrides the saved token reduction: the answer is the one the model gives with that config."""
    from unicode_mllm.addons.token_reduction.config import MustDropMergeConfig, TokenReductionConfig

    picture = write_png(tmp_path / "a.png")
    reduced = UniCodeMLLM.from_pretrained(tiny_mllm_dir).eval()
    reduced.token_reduction = TokenReductionConfig(
        vision="mustdrop_merge", mustdrop_merge=MustDropMergeConfig(window=(2, 2), threshold=-1.0)
    )
    expected = answer(reduced, Image.open(picture), "where", max_new_tokens=8)[0]
    args = ("ask", "--model", str(tiny_mllm_dir), "--image", str(picture), "--max-new-tokens", "8", "--device", "cpu")
    reduce = ("--reduce", "vision=mustdrop_merge", "--reduce", "mustdrop_merge.threshold=-1")
    code, out, err = run(capsys, *args, *reduce, "where")
    assert code == 0, err
    assert out.strip() == expected


def test_cli_ask_jsonl_writes_one_answer_per_line(capsys, tiny_mllm_dir, tmp_path):
    write_png(tmp_path / "a.png")
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps({"id": 7, "image": "a.png", "question": "where"}) + "\n\n" + json.dumps({"question": "how many"})
    )
    answers = tmp_path / "out" / "answers.jsonl"
    args = ("ask", "--model", str(tiny_mllm_dir), "--jsonl", str(questions), "--out", str(answers))
    code, out, err = run(capsys, *args, "--max-new-tokens", "4", "--device", "cpu")
    assert code == 0, err
    assert "2 answers written" in out
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question"] for r in rows] == ["where", "how many"] and rows[0]["id"] == 7
    assert all(isinstance(r["answer"], str) and r["answer"] for r in rows)


def test_cli_generate_writes_numbered_pngs_a_grid_and_the_ids(capsys, tiny_mllm_dir, model, tmp_path):
    out_png = tmp_path / "draw" / "out.png"
    args = ("generate", "--model", str(tiny_mllm_dir), "a red circle", "-o", str(out_png), "-n", "2")
    code, out, err = run(capsys, *args, "--seed", "3", "--top-k", "30", "--cfg-scale", "2", "--device", "cpu")
    assert code == 0, err
    assert "seed 3" in out
    for i in range(2):
        assert Image.open(out_png.with_name(f"out_{i}.png")).size == (32, 32)
    assert Image.open(out_png.with_name("out_grid.png")).width >= 2 * 128
    record = json.loads(out_png.with_suffix(".json").read_text())
    again = generate_images(model, ["a red circle"], num_images_per_prompt=2, seed=3, top_k=30, cfg_scale=2.0)
    assert record["token_ids"] == again.token_ids.tolist()
    assert record["settings"]["cfg_scale"] == 2.0 and record["settings"]["depth_temperatures"] is None
    d = model.code_shape[2]
    temps = ",".join(["1"] + ["0.5"] * (d - 1))
    code, out, err = run(capsys, *args, "--seed", "3", "--depth-temperatures", temps, "--device", "cpu")
    assert code == 0, err
    record = json.loads(out_png.with_suffix(".json").read_text())
    assert record["settings"]["depth_temperatures"] == [1.0] + [0.5] * (d - 1)


def test_cli_chat_answers_draws_resets_and_reports_errors(capsys, tiny_mllm_dir, tmp_path, monkeypatch):
    picture = write_png(tmp_path / "a.png")
    lines = [
        f"/image {picture}",
        "what colour is it",
        f"/image {tmp_path / 'missing.png'}",
        "draw: a red circle",
        "/draw a blue square",
        "/reset",
        "where",
        "/quit",
        "never read",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    out_dir = tmp_path / "drawings"
    code, out, err = run(capsys, "chat", "--model", str(tiny_mllm_dir), "--out-dir", str(out_dir), "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["image_001.png", "image_002.png"]
    assert out.count("assistant:") == 4 and "(conversation reset)" in out
    assert err.count("error:") == 1 and "missing.png" in err and "image file not found" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask", "--model", "{missing}", "where"], "is not a saved UniCodeMLLM"),
        (["ask", "--model", "{empty}", "where"], "it is not a saved UniCodeMLLM"),
        (["ask", "--model", "{model}", "--image", "{garbage}", "where"], "not a readable image"),
        (["generate", "--model", "{model}", ""], "prompt is empty"),
        (["generate", "--model", "{model}", "{long}"], "at most 512 positions"),
        (["ask", "--model", "{model}", "   "], "question is empty"),
        (["generate", "--model", "{model}", "a red circle", "--depth-temperatures", "1,x"], "comma-separated list"),
        (["ask", "--model", "{model}", "where", "--dtype", "fp8"], "dtype 'fp8' is unknown"),
        (["generate", "--model", "{model}", "a red circle", "--dtype", "fp16"], "not supported on CPU"),
        (["ask", "--model", "{model}", "where", "--reduce", "vision=bogus"], "must be one of"),
        (["ask", "--model", "{model}", "where", "--reduce", "visoin=ficoco_v"], "did you mean 'vision'"),
        (
            ["ask", "--model", "{model}", "where", "--reduce", "llm=ficoco_l", "--reduce", "ficoco_l.layers=[9]"],
            "does not exist",
        ),
    ],
)
def test_cli_inference_errors_are_one_line(capsys, tiny_mllm_dir, tmp_path, args, message):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x00\x01 definitely not an image")
    (tmp_path / "empty").mkdir()
    values = dict(
        missing=str(tmp_path / "nope"),
        empty=str(tmp_path / "empty"),
        model=str(tiny_mllm_dir),
        garbage=str(garbage),
        long=" ".join(["red circle"] * 300),
    )
    code, _, err = run(capsys, *[a.format(**values) for a in args], "--device", "cpu")
    assert code == 2
    assert err.startswith("error:") and message in err and err.strip().count("\n") == 0


def test_cli_ask_in_bf16_loads_the_lm_in_bf16_and_answers(capsys, tiny_mllm_dir, tmp_path, monkeypatch):
    import unicode_mllm.cli.inference as cli

    loaded = []
    original = cli._load_inference_model

    def spy(*args):
        model = original(*args)
        loaded.append((model.lm.dtype, next(model.visual_tokenizer.parameters()).dtype))
        return model

    monkeypatch.setattr(cli, "_load_inference_model", spy)
    a = write_png(tmp_path / "a.png")
    args = ("ask", "--model", str(tiny_mllm_dir), "--image", str(a), "--max-new-tokens", "4", "--device", "cpu")
    code, out, err = run(capsys, *args, "--dtype", "bf16", "where")
    assert code == 0, err
    assert out.strip() and loaded == [(torch.bfloat16, torch.float32)]  # the visual tokenizer stays fp32
