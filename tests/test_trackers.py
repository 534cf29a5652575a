"""train.log_with: the run's curves (and stage 1's reconstruction grids) through accelerate's trackers."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.test_lm import TINY as TINY_LM
from tests.test_mllm_training import make_config as mllm_config
from tests.test_tokenizer_training import tiny_cfg
from unicode_mllm.config import config_from_dict, load_config
from unicode_mllm.errors import UserError
from unicode_mllm.runtime import trackers
from unicode_mllm.stages.lm import LMTrainConfig, train_lm
from unicode_mllm.stages.mllm import MLLMTrainConfig, train_mllm
from unicode_mllm.stages.tokenizer.trainer import TokenizerTrainer

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _events(log_dir, project):
    folder = log_dir / project
    assert any(p.name.startswith("events.out.tfevents") for p in folder.iterdir()), list(folder.iterdir())
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def _jsonl_steps(path, key):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["step"] for r in rows if key in r]


def test_stage1_tensorboard_scalars_at_the_metrics_steps_and_grids(tiny_lm_dir, tiny_shapes_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_lm_dir, tiny_shapes_dir, out, **{"train.log_with": "tensorboard"})
    TokenizerTrainer(cfg).fit()
    events = _events(out / "trackers", "stage1-tokenizer")
    tags = events.Tags()
    assert {"total", "psnr", "psnr_val"} <= set(tags["scalars"]), tags["scalars"]
    for key in ("total", "psnr_val"):
        assert [e.step for e in events.Scalars(key)] == _jsonl_steps(out / "metrics.jsonl", key)
    last_total = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"total"' in line]
    assert events.Scalars("total")[-1].value == pytest.approx(last_total[-1]["total"], rel=1e-6)
    assert "reconstructions" in tags["images"]  # the samples/recon-*.png grid
    assert [e.step for e in events.Images("reconstructions")] == [6]


def test_stage0_and_stage2_tensorboard_scalars(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    lm_out = tmp_path / "lm"
    cfg = load_config(LMTrainConfig, overrides=[*TINY_LM, "train.log_with=tensorboard", f"train.log_dir={tmp_path}/tb"])
    train_lm(cfg, lm_out)
    events = _events(tmp_path / "tb", "stage0-lm")
    assert {"train/loss", "val/loss", "val/ppl"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == _jsonl_steps(lm_out / "log.jsonl", "train/loss")

    mllm_out = tmp_path / "mllm"
    cfg = mllm_config(
        tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, mllm_out, train={"log_with": "tensorboard"}
    )
    train_mllm(cfg)
    events = _events(mllm_out / "trackers", "stage2-mllm")
    assert {"loss", "heldout/vqa_exact"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == _jsonl_steps(mllm_out / "metrics.jsonl", "loss")


def test_a_missing_tracker_package_names_the_extra(monkeypatch, tiny_lm_dir, tiny_shapes_dir, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path, **{"train.log_with": "wandb"})
    with pytest.raises(UserError, match=r"pip install 'unicode-mllm\[wandb\]'") as info:
        TokenizerTrainer(cfg)
    assert "\n" not in str(info.value)


def test_log_with_is_checked_by_the_config_and_none_is_the_default():
    assert config_from_dict(MLLMTrainConfig, {}).train.log_with == "none"
    assert load_config(LMTrainConfig).train.log_dir is None
    with pytest.raises(Exception, match="log_with"):
        config_from_dict(MLLMTrainConfig, {"train": {"log_with": "mlflow"}})
    assert trackers.accelerator_kwargs(config_from_dict(MLLMTrainConfig, {}).train, "out") == {}
