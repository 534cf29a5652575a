"""LoRA at real scale's memory: the frozen base in bf16 when the run trains in bf16, the adapters and the
trainable embedding table in fp32, and the adapter folder holding the trained embedding rows."""

from __future__ import annotations

import torch
from safetensors import safe_open

from unicode_mllm.model import UniCodeMLLM
from unicode_mllm.stages.mllm import MLLMTrainer

from .test_mllm_training import make_config

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}


def test_bf16_lora_keeps_the_base_in_bf16_and_what_trains_in_fp32(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    cfg = make_config(
        tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, model={"lora": LORA},
        train={"steps": 2, "mixed_precision": "bf16"},
    )  # fmt: skip
    trainer = MLLMTrainer(cfg)
    params = dict(trainer.mllm.lm.named_parameters())
    frozen = {n: p.dtype for n, p in params.items() if not p.requires_grad}
    trained = {n: p.dtype for n, p in params.items() if p.requires_grad}
    assert frozen and set(frozen.values()) == {torch.bfloat16}  # every frozen LM weight: half the bytes
    assert set(trained.values()) == {torch.float32} and any("embed_tokens" in n for n in trained)
    assert torch.isfinite(torch.tensor(trainer.train_step()["loss"]))
    full = make_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path / "full",
                       train={"mixed_precision": "bf16"})  # fmt: skip
    assert {p.dtype for p in MLLMTrainer(full).mllm.parameters()} == {torch.float32}  # full FT: fp32 master weights


def test_the_adapter_folder_holds_the_trained_embedding_rows(
    tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path
):
    cfg = make_config(
        tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, model={"lora": LORA}, train={"steps": 2}
    )
    trainer = MLLMTrainer(cfg)
    trainer.fit()
    trained = UniCodeMLLM.from_pretrained(tmp_path / "final").lm.get_input_embeddings().weight  # merged model
    base = UniCodeMLLM.from_components(tiny_lm_dir, tiny_visual_tokenizer_dir)
    assert not torch.equal(base.lm.get_input_embeddings().weight, trained)  # the run changed the table
    with safe_open(str(tmp_path / "final_lora" / "adapter_model.safetensors"), "pt") as f:
        assert any("embed_tokens" in k for k in f.keys())  # noqa: SIM118 (was: the adapters only)
    base.load_lora_adapter(tmp_path / "final_lora")
    assert torch.equal(base.lm.get_input_embeddings().weight, trained)  # base + adapter folder = the trained model
