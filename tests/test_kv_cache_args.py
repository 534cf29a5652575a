"""The KV cache is passed and read under the name the installed transformers uses (`unicode_mllm.kv_cache_args`):
cached decoding equals full recomputation for every architecture the project meets, peft-wrapped or not, and
for an LM with the pre-rename signature; no FutureWarning and no logged cache-name deprecation on the way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from unicode_mllm.addons.token_reduction import TokenReductionConfig, decode_step, reduced_prefill, sequence_from_embeds
from unicode_mllm.generation import IncrementalDecoder
from unicode_mllm.kv_cache_args import CACHE, LEGACY_CACHE, cache_argument, output_cache
from unicode_mllm.splice import position_ids_from_attention_mask

pytestmark = [
    pytest.mark.filterwarnings("error::FutureWarning"),
    # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` (FutureWarning since transformers 5.x)
    # inside `PeftModel.__init__`: peft's code, not ours; the last filter wins, so this one is listed last.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

WIDTH, VOCAB = 32, 61
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=WIDTH,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
ARCHITECTURES = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=WIDTH, n_layer=2, n_head=4)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DECODER)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DECODER)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DECODER)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**DECODER, head_dim=8)),
    "phi": lambda: PhiForCausalLM(PhiConfig(**DECODER)),
}


def make_lm(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[name]().eval()


@pytest.fixture(autouse=True)
def no_logged_cache_rename(monkeypatch):
    """transformers logs (once per process, not as a warning) when `past_key_values`/`cache_params` is used on
    an output or a ModelOutput is built with it; record that log here and fail on it."""
    generic = pytest.importorskip("transformers.utils.generic")
    logged: list[str] = []
    if hasattr(generic, "logger"):
        monkeypatch.setattr(generic.logger, "warning_once", lambda message, *args, **kwargs: logged.append(message))
    yield
    assert not [m for m in logged if "past_key_values" in m or "cache_params" in m]


def left_padded_prompt(seed: int = 0) -> tuple[Tensor, Tensor]:
    """inputs_embeds (2, 7, WIDTH) and attention_mask (2, 7): row 1 has 3 slots of left padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    return torch.randn(2, 7, WIDTH, generator=g) * mask[..., None], mask


def decode(lm: Any, use_cache: bool) -> list[Tensor]:
    """Prefill the prompt, then feed three ids; the (2, V) logits of every call."""
    embeds, mask = left_padded_prompt()
    decoder = IncrementalDecoder(lm, use_cache=use_cache)
    with torch.no_grad():
        logits = [decoder.prefill(embeds, mask)]
        for ids in ([5, 6], [7, 8], [9, 10]):
            logits.append(decoder.step(torch.tensor(ids)))
    assert (decoder.cache is not None) == use_cache  # the cache came back out of the output and was fed again
    return logits


def assert_cache_matches_recomputation(lm: Any) -> None:
    for step, (cached, full) in enumerate(zip(decode(lm, True), decode(lm, False), strict=True)):
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_cached_decoding_equals_recomputation_on_every_architecture(name):
    assert_cache_matches_recomputation(make_lm(name))


def test_peft_wrapped_lm_takes_its_base_models_cache_argument():
    lm = make_lm("llama")
    wrapped = get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    assert cache_argument(wrapped) == cache_argument(lm)
    assert_cache_matches_recomputation(wrapped)


@dataclass
class LegacyOutput:
    logits: Tensor
    past_key_values: Any = None


@dataclass
class StateSpaceOutput:
    logits: Tensor
    cache_params: Any = None


class LegacyLM(nn.Module):
    """An LM with the transformers 5.0 signature and output field (`past_key_values`), over a current one."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        kwargs[cache_argument(self.inner)] = past_key_values
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return LegacyOutput(logits=out.logits, past_key_values=output_cache(out))


def test_an_lm_with_the_pre_rename_signature_gets_past_key_values():
    legacy = LegacyLM(make_lm("llama")).eval()
    assert cache_argument(legacy) == LEGACY_CACHE
    assert output_cache(LegacyOutput(logits=torch.zeros(1), past_key_values="kv")) == "kv"
    assert output_cache(StateSpaceOutput(logits=torch.zeros(1), cache_params="state")) == "state"
    assert_cache_matches_recomputation(legacy)


def test_lms_and_decoder_layers_take_the_name_of_the_librarys_outputs():
    """transformers 5.25 (installed): `cache` everywhere; 5.0-5.18: `past_key_values` everywhere."""
    lm = make_lm("llama")
    expected = CACHE if CACHE in CausalLMOutputWithPast.__dataclass_fields__ else LEGACY_CACHE
    assert cache_argument(lm) == cache_argument(lm.model.layers[0]) == expected


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_reduced_prefill_and_decoding_pass_the_cache_to_each_layer(name):
    """The token-reduction layer loop calls the HF decoder layers itself (with nothing pruned: the plain LM)."""
    lm = make_lm(name)
    embeds, mask = left_padded_prompt()
    sequence = sequence_from_embeds(embeds, mask, torch.zeros_like(mask, dtype=torch.bool))
    out = reduced_prefill(lm, sequence, TokenReductionConfig(), generation_mode="text")
    new = torch.randn(2, 1, WIDTH, generator=torch.Generator().manual_seed(1))
    step = decode_step(lm, out.cache, new)
    full_embeds, full_mask = torch.cat([embeds, new], dim=1), torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    positions = position_ids_from_attention_mask(full_mask)
    with torch.no_grad():
        reference = lm(inputs_embeds=full_embeds, attention_mask=full_mask, position_ids=positions).logits
    torch.testing.assert_close(step, reference[:, -1], atol=1e-5, rtol=1e-4)
    assert out.cache.lengths() == [8, 8]
