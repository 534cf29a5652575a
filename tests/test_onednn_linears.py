"""oneDNN linears while decoding on the CPU (`generation/onednn_linears.py`): the same tokens as PyTorch's default
fp32 kernels, copies that follow the weights, and layers left alone where the switch must not apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.test_kv_cache_args import ARCHITECTURES, left_padded_prompt, make_lm
from unicode_mllm.generation import SamplingSettings, mix_guidance, prompt_builder
from unicode_mllm.generation.image_generation import generate_image_sequences
from unicode_mllm.generation.incremental_decoding import IncrementalDecoder
from unicode_mllm.generation.onednn_linears import OneDNNLinears, onednn_linears
from unicode_mllm.generation.prompts import prompt_sample
from unicode_mllm.generation.sampling import choose_next_tokens, uniform_draws
from unicode_mllm.model import UniCodeMLLM

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")


def decode(lm, kernels: str, sampling: SamplingSettings, cfg_scale: float = 1.0, steps: int = 16) -> torch.Tensor:
    """A left-padded 2-row prompt (4 rows with guidance), `steps` tokens as an image span is decoded."""
    embeds, mask = left_padded_prompt(seed=1)
    guided = cfg_scale != 1.0
    if guided:
        uncond, uncond_mask = left_padded_prompt(seed=2)
        embeds, mask = torch.cat([embeds, uncond]), torch.cat([mask, uncond_mask])
    uniforms = None if sampling.is_greedy else uniform_draws([3, 4], steps)
    decoder = IncrementalDecoder(lm, linear_kernels=kernels)
    chosen = []
    with torch.no_grad():
        logits = decoder.prefill(embeds, mask, max_new_tokens=steps)
        assert decoder._linears.enabled == (kernels != "default" and any(type(m) is nn.Linear for m in lm.modules()))
        for step in range(steps):
            step_logits = mix_guidance(logits, cfg_scale) if guided else logits
            ids = choose_next_tokens(step_logits, sampling, None if uniforms is None else uniforms[:, step])
            chosen.append(ids)
            logits = decoder.step(ids.repeat(2) if guided else ids)
    return torch.stack(chosen, dim=1)  # (2, steps)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_onednn_tokens_equal_default_kernel_tokens_on_every_architecture(name):
    lm = make_lm(name)
    for sampling, cfg_scale in [
        (SamplingSettings(0.0), 1.0),
        (SamplingSettings(0.0), 3.0),
        (SamplingSettings(1.0), 1.0),
        (SamplingSettings(1.0, top_k=20), 2.0),
    ]:
        onednn = decode(lm, "onednn", sampling, cfg_scale)
        assert torch.equal(onednn, decode(lm, "default", sampling, cfg_scale)), (name, sampling, cfg_scale)
    assert not any("forward" in vars(m) for m in lm.modules())  # every switched layer was restored


def test_image_spans_of_the_saved_model_equal_default_kernel_spans(tiny_mllm_dir, monkeypatch):
    """Through `generate_image_sequences` (its decoder's default `linear_kernels="auto"`), sampled and greedy."""
    import unicode_mllm.generation.incremental_decoding as incremental

    monkeypatch.setattr("unicode_mllm.generation.onednn_linears.MIN_WEIGHT_ELEMENTS", 0)  # the tiny LM's are small
    model = UniCodeMLLM.from_pretrained(tiny_mllm_dir).eval()
    builder = prompt_builder(model)
    rows = [prompt_sample(builder, builder.text_to_image_prompt(p)) for p in ("a red circle", "two blue stars")]
    packed: list[bool] = []

    def spy(lm, kind):
        linears = onednn_linears(lm, kind)
        packed.append(linears.enabled)
        return linears

    for sampling, seed in [(SamplingSettings(1.0, top_k=50), 3), (SamplingSettings(0.0), None)]:
        monkeypatch.setattr(incremental, "onednn_linears", spy)
        fast = generate_image_sequences(model, rows, sampling=sampling, seed=seed)[0]
        monkeypatch.setattr(incremental, "onednn_linears", lambda lm, kind: OneDNNLinears(lm, "default"))
        assert torch.equal(fast, generate_image_sequences(model, rows, sampling=sampling, seed=seed)[0])
    assert packed == [True, True]


def test_logits_are_close_and_the_copies_follow_changed_weights():
    lm = make_lm("llama")
    x = torch.randn(2, 5, lm.config.hidden_size)
    with torch.no_grad():
        packed = onednn_linears(lm, "onednn")
        assert packed.enabled and onednn_linears(lm, "onednn") is packed  # reused while no weight changed
        with packed.active():
            fast = lm.lm_head(x)
        torch.testing.assert_close(fast, lm.lm_head(x), atol=1e-6, rtol=1e-5)
        lm.lm_head.weight.mul_(2.0)  # an in-place update, as an optimizer step makes
        repacked = onednn_linears(lm, "onednn")
        assert repacked is not packed
        with repacked.active():
            torch.testing.assert_close(lm.lm_head(x), fast * 2.0, atol=1e-5, rtol=1e-5)


def test_the_switch_leaves_autograd_bf16_and_foreign_layers_alone(monkeypatch):
    lm = make_lm("llama")
    with torch.no_grad():
        packed = OneDNNLinears(lm, "onednn")
    x = torch.randn(3, lm.config.hidden_size, requires_grad=True)
    with packed.active():  # autograd on: the default kernels, gradients flow
        lm.lm_head(x).sum().backward()
    assert x.grad is not None and "forward" not in vars(lm.lm_head)
    with torch.no_grad():
        assert not OneDNNLinears(lm.to(torch.bfloat16), "onednn").enabled  # bf16 linears run on oneDNN already
        assert not OneDNNLinears(nn.Sequential(nn.Conv1d(4, 4, 1)), "onednn").enabled
        assert not OneDNNLinears(make_lm("llama"), "auto").enabled  # too small for `auto`
        monkeypatch.setattr("unicode_mllm.generation.onednn_linears.MIN_WEIGHT_ELEMENTS", 0)
        assert OneDNNLinears(make_lm("llama"), "auto").enabled
        monkeypatch.setattr("unicode_mllm.generation.onednn_linears._available_bytes", lambda: 0)
        assert not OneDNNLinears(make_lm("llama"), "auto").enabled  # the copies would not fit
        assert OneDNNLinears(make_lm("llama"), "onednn").enabled
    with pytest.raises(ValueError, match="linear_kernels must be one of"):
        IncrementalDecoder(lm, linear_kernels="mkl")
