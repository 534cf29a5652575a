"""The preallocated (static) KV cache of `IncrementalDecoder`: same tokens as the growing DynamicCache.

On the tiny saved LLaMA through `generate_image_sequences` (greedy, sampled, left-padded batches, guidance) and
on the other architectures tests/test_kv_cache_args.py builds, through a decode loop like the image span's. The
static cache attends over its unused (masked) slots too, so logits may differ from the dynamic cache's in the
last float bits (measured: <= 6e-8 in fp32); the chosen tokens are what must be equal.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from tests.test_kv_cache_args import ARCHITECTURES, WIDTH, left_padded_prompt, make_lm
from unicode_mllm.errors import UserError
from unicode_mllm.generation import SamplingSettings, generate_images, mix_guidance, prompt_builder
from unicode_mllm.generation.image_generation import generate_image_sequences
from unicode_mllm.generation.incremental_decoding import IncrementalDecoder, supports_static_cache
from unicode_mllm.generation.prompts import prompt_sample
from unicode_mllm.generation.sampling import choose_next_tokens, uniform_draws
from unicode_mllm.model import UniCodeMLLM

pytestmark = [
    pytest.mark.filterwarnings("error::FutureWarning"),
    # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` (as in tests/test_kv_cache_args.py)
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

PROMPTS = ["a red circle at the top left", "a small blue square", "a green star in the center and a red triangle"]


@pytest.fixture(scope="module")
def model(tiny_mllm_dir) -> UniCodeMLLM:
    return UniCodeMLLM.from_pretrained(tiny_mllm_dir).eval()


@pytest.fixture
def cache_types(monkeypatch) -> list[str]:
    """The class name of the cache each IncrementalDecoder.prefill built, in call order."""
    seen: list[str] = []
    original = IncrementalDecoder.prefill

    def prefill(self, *args, **kwargs):
        logits = original(self, *args, **kwargs)
        seen.append(type(self.cache).__name__)
        return logits

    monkeypatch.setattr(IncrementalDecoder, "prefill", prefill)
    return seen


@pytest.mark.parametrize(
    ("sampling", "cfg_scale", "seed"),
    [
        (SamplingSettings(0.0), 1.0, None),
        (SamplingSettings(0.0), 3.0, None),
        (SamplingSettings(1.0, top_k=50), 1.0, 5),
        (SamplingSettings(1.0, top_p=0.9), 2.5, 9),
    ],
    ids=["greedy", "greedy-cfg", "sampled", "sampled-cfg"],
)
def test_static_cache_spans_equal_dynamic_cache_spans(model, cache_types, sampling, cfg_scale, seed):
    builder = prompt_builder(model)
    rows = [prompt_sample(builder, builder.text_to_image_prompt(p)) for p in PROMPTS for _ in range(2)]
    assert len({len(r) for r in rows}) == 3  # the batch is really left-padded

    def run(kind: str, batch_size: int) -> torch.Tensor:
        kwargs = dict(sampling=sampling, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size, cache_kind=kind)
        return generate_image_sequences(model, rows, **kwargs)[0]

    static = run("static", 6)
    dynamic = run("dynamic", 6)
    auto = run("auto", 4)
    assert cache_types == ["StaticCache", "DynamicCache", "StaticCache", "StaticCache"]
    assert torch.equal(static, dynamic)
    assert torch.equal(static, auto)  # and batch-independent with the static cache too


def test_generate_images_takes_the_static_cache_by_default(model, cache_types):
    out = generate_images(model, PROMPTS[:2], seed=3, top_k=40, decode=False)
    assert cache_types == ["StaticCache"]
    full = generate_images(model, PROMPTS[:2], seed=3, top_k=40, decode=False, use_cache=False)
    assert torch.equal(out.sequences, full.sequences)


def decode_loop(lm, kind: str, sampling: SamplingSettings, cfg_scale: float, steps: int = 12) -> torch.Tensor:
    """A left-padded 2-row prompt (4 rows with guidance: cond then uncond), `steps` tokens like the image span."""
    embeds, mask = left_padded_prompt(seed=1)
    guided = cfg_scale != 1.0
    if guided:
        uncond, uncond_mask = left_padded_prompt(seed=2)
        embeds, mask = torch.cat([embeds, uncond.flip(0)]), torch.cat([mask, uncond_mask.flip(0)])
    uniforms = None if sampling.is_greedy else uniform_draws([11, 12], steps)
    decoder = IncrementalDecoder(lm, cache_kind=kind)
    chosen = []
    with torch.no_grad():
        logits = decoder.prefill(embeds, mask, max_new_tokens=steps)
        for step in range(steps):
            step_logits = mix_guidance(logits, cfg_scale) if guided else logits
            ids = choose_next_tokens(step_logits, sampling, None if uniforms is None else uniforms[:, step])
            chosen.append(ids)
            logits = decoder.step(ids.repeat(2) if guided else ids)
    assert isinstance(decoder.cache, StaticCache if kind == "static" else DynamicCache)
    return torch.stack(chosen, dim=1)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_static_cache_tokens_equal_dynamic_cache_tokens_on_every_architecture(name):
    lm = make_lm(name)
    assert supports_static_cache(lm)
    for sampling, cfg_scale in [
        (SamplingSettings(0.0), 1.0),
        (SamplingSettings(0.0), 3.0),
        (SamplingSettings(1.0), 1.0),
        (SamplingSettings(1.0, top_k=20), 2.0),
    ]:
        static = decode_loop(lm, "static", sampling, cfg_scale)
        assert torch.equal(static, decode_loop(lm, "dynamic", sampling, cfg_scale)), (sampling, cfg_scale)


def test_static_logits_match_dynamic_logits_closely():
    lm = make_lm("llama")
    embeds, mask = left_padded_prompt()
    out = {}
    for kind in ("static", "dynamic"):
        decoder = IncrementalDecoder(lm, cache_kind=kind)
        with torch.no_grad():
            logits = [decoder.prefill(embeds, mask, max_new_tokens=3)]
            logits += [decoder.step(torch.tensor(ids)) for ids in ([5, 6], [7, 8], [9, 10])]
        out[kind] = logits
    for step, (a, b) in enumerate(zip(out["static"], out["dynamic"], strict=True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=f"step {step}")


def test_static_cache_is_full_after_max_new_tokens_and_dynamic_without_a_budget():
    lm = make_lm("llama")
    embeds, mask = left_padded_prompt()
    decoder = IncrementalDecoder(lm)
    with torch.no_grad():
        decoder.prefill(embeds, mask, max_new_tokens=1)
        assert decoder.static and decoder.attention_mask.shape == (2, 8)
        decoder.step(torch.tensor([1, 2]))
        with pytest.raises(RuntimeError, match="static cache holds 8 tokens"):
            decoder.step(torch.tensor([3, 4]))
        decoder.prefill(embeds, mask)  # no budget: the growing cache, as before
        assert not decoder.static
        decoder.step(torch.tensor([1, 2]))
        assert isinstance(decoder.cache, DynamicCache)
    with pytest.raises(ValueError, match="cache_kind must be one of"):
        IncrementalDecoder(lm, cache_kind="paged")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        decoder.prefill(embeds, mask, max_new_tokens=-1)


class NoCompileLlama(LlamaForCausalLM):
    """A LLaMA whose class says it cannot run compiled / on a static cache (as HF's MoE and Mamba models do)."""

    _can_compile_fullgraph = False


def test_an_lm_without_static_cache_support_falls_back_to_the_dynamic_cache():
    config = LlamaConfig(
        vocab_size=61, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    lm = NoCompileLlama(config).eval()
    assert not supports_static_cache(lm)
    with pytest.raises(ValueError, match="does not support a static KV cache"):
        IncrementalDecoder(lm, cache_kind="static")
    sampling = SamplingSettings(0.0)
    embeds, mask = left_padded_prompt()
    decoder = IncrementalDecoder(lm)  # auto
    with torch.no_grad():
        decoder.prefill(embeds, mask, max_new_tokens=4)
        decoder.step(torch.tensor([1, 2]))
    assert not decoder.static and isinstance(decoder.cache, DynamicCache)
    assert torch.equal(decode_loop(lm, "auto", sampling, 1.0), decode_loop(lm, "dynamic", sampling, 1.0))


def test_image_decoding_benchmark_reports_static_dynamic_and_hf(capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_image_decoding.py"
    spec = importlib.util.spec_from_file_location("bench_image_decoding", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--shapes", "tiny", "--batches", "2", "--cfg", "on", "--span", "6", "--prompt-len", "8", "--repeats", "1"]
    assert bench.main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["static_equals_dynamic_tokens"] and row["static_equals_sgemm_tokens"] and row["rows_per_forward"] == 4
    assert min(row[f"{name}_tokens_per_s"] for name in ("static", "sgemm", "dynamic", "hf")) > 0
    assert row["static_over_sgemm"] > 0 and row["sgemm_over_hf"] > 0  # the oneDNN linears beside the default


def test_a_peft_wrapped_lm_gets_the_static_cache_of_its_base_model():
    from peft import LoraConfig, get_peft_model

    lm = make_lm("llama")
    wrapped = get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    assert supports_static_cache(wrapped)
    sampling = SamplingSettings(1.0, top_k=20)
    assert torch.equal(decode_loop(wrapped, "static", sampling, 2.0), decode_loop(wrapped, "dynamic", sampling, 2.0))


def test_an_unknown_cache_kind_is_one_user_error(model):
    from unicode_mllm.errors import UserError

    with pytest.raises(UserError, match="cache_kind must be one of"):
        generate_images(model, PROMPTS[:1], cache_kind="paged", decode=False)


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, None), (1.0, 4)], ids=["greedy", "sampled"])
def test_static_cache_answers_equal_dynamic_cache_answers(model, cache_types, temperature, seed):
    """Answers (the VQA / chat path) on the preallocated cache: the same tokens as on the growing one."""
    from PIL import Image

    from unicode_mllm.generation.answering import generate_answers, question_prompts

    pixels = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(32, 32, 3, generator=pixels) * 255).byte().numpy())
    questions = ["what shape is at the top left?", "how many shapes are there?", "draw a red circle"]
    prompts = question_prompts(model, [image, image, None], questions)
    settings = dict(max_new_tokens=24, temperature=temperature, top_k=50, seed=seed, allow_images=True)
    static = generate_answers(model, prompts, cache_kind="static", **settings)
    dynamic = generate_answers(model, prompts, cache_kind="dynamic", **settings)
    auto = generate_answers(model, prompts, batch_size=2, **settings)
    assert cache_types == ["StaticCache", "DynamicCache", "StaticCache", "StaticCache"]
    assert (
        [a.token_ids.tolist() for a in static]
        == [a.token_ids.tolist() for a in dynamic]
        == [a.token_ids.tolist() for a in auto]
    )
    assert [a.text for a in static] == [a.text for a in dynamic]


def test_compiled_steps_give_the_eager_tokens(model, monkeypatch):
    """compile_step: torch.compile'd decode steps on a bucketed static cache choose the eager static cache's tokens,
    also for a second batch of another prompt length (the same bucket); refused without the cache.

    Through dynamo with the aot_eager backend (the graph capture and the bucketed cache are what this project adds;
    inductor's code generation costs ~30 s here and is timed by benchmarks/bench_image_decoding.py --compile).
    """
    from unicode_mllm.generation import incremental_decoding

    monkeypatch.setattr(incremental_decoding, "COMPILE_BACKEND", "aot_eager")
    builder = prompt_builder(model)
    rows = [prompt_sample(builder, builder.text_to_image_prompt(p)) for p in PROMPTS]
    kwargs = dict(sampling=SamplingSettings(1.0, top_k=50), cfg_scale=2.0, seed=7, batch_size=2)
    eager = generate_image_sequences(model, rows, **kwargs)[0]
    compiled = generate_image_sequences(model, rows, compile_step=True, **kwargs)[0]
    assert torch.equal(eager, compiled)
    with pytest.raises(UserError, match="compile_step needs the static KV cache"):
        generate_image_sequences(model, rows, compile_step=True, cache_kind="dynamic", **kwargs)
