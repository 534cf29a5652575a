"""Every YAML preset in configs/ loads and validates against its config class (the GPU ones included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unicode_mllm.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _classes():
    from unicode_mllm.stages.lm import LMTrainConfig
    from unicode_mllm.stages.mllm import MLLMTrainConfig
    from unicode_mllm.stages.tokenizer.config import TokenizerTrainConfig

    return {"lm": LMTrainConfig, "tokenizer": TokenizerTrainConfig, "mllm": MLLMTrainConfig}


@pytest.mark.parametrize(
    "path",
    sorted(p for d in ("lm", "tokenizer", "mllm") for p in (CONFIGS / d).glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_preset_loads_and_validates(path):
    cfg = load_config(_classes()[path.parent.name], path)
    assert cfg is not None


def test_gpu_stage2_preset_mirrors_the_reference_recipe():
    from unicode_mllm.stages.mllm import MLLMTrainConfig

    cfg = load_config(MLLMTrainConfig, CONFIGS / "mllm" / "vicuna7b_lora.yaml")
    lora = cfg.model.lora
    assert (lora.enabled, lora.r, lora.alpha) == (True, 128, 256)
    assert cfg.optim.lr == 2e-4 and cfg.optim.warmup_ratio == 0.03 and cfg.train.mixed_precision == "bf16"


@pytest.mark.parametrize("name", sorted(p.name for p in (CONFIGS / "accelerate").glob("*.yaml")))
def test_accelerate_configs_parse_with_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(CONFIGS / "accelerate" / name))
    assert config.num_processes >= 1 and config.mixed_precision == ("no" if config.use_cpu else "bf16")
    assert config.distributed_type in ("MULTI_GPU", "NO", "FSDP", "DEEPSPEED")
    if config.distributed_type == "DEEPSPEED":  # stages 0 and 2 (tests/test_deepspeed.py runs the CPU ones)
        assert config.deepspeed_config["zero_stage"] in (2, 3)
        assert "gradient_clipping" not in config.deepspeed_config  # the trainer sets it from optim.grad_clip
        if config.deepspeed_config["zero_stage"] == 3:
            assert config.deepspeed_config["zero3_save_16bit_model"] is True
    if config.distributed_type == "FSDP":  # stage 2's FSDP2 settings (tests/test_fsdp.py runs the CPU one)
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
