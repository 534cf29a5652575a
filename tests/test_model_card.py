"""Model cards: every saved model folder gets a README.md written from its run's real files."""

from __future__ import annotations

import json
import sys

import yaml

from tests.test_lm import TINY as TINY_LM
from tests.test_mllm_training import make_config as mllm_config
from tests.test_tokenizer_training import tiny_cfg
from unicode_mllm.config import load_config
from unicode_mllm.runtime.model_card import render_card
from unicode_mllm.stages.lm import LMTrainConfig, train_lm
from unicode_mllm.stages.mllm import train_mllm
from unicode_mllm.stages.tokenizer.trainer import TokenizerTrainer


def _figure(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _check_card(card: str, final_metrics: dict, config_file, data_keys=("data",)) -> None:
    # every final metric with its real value, in the table
    for key, value in final_metrics.items():
        if key in ("data", "data_reader", "corpus_tokens", "tokens_seen"):
            continue
        assert f"| {key} | " in card, key
        if isinstance(value, int | float) and not isinstance(value, bool):
            assert f"| {key} | {_figure(value)} |" in card, (key, value)
    # the data figures (samples, skips) as final_metrics.json has them
    data_block = card.split("What the run read")[1].split("```json\n")[1].split("```")[0]
    figures = json.loads(data_block)
    for key in data_keys:
        assert figures[key] == final_metrics[key], key
    # the training config, whole, as the run resolved it
    config_block = card.split("## Training config")[1].split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config_block) == yaml.safe_load(config_file.read_text())
    assert "## Command" in card and "## Intended use" in card and "not a capable model" in card


def test_stage1_card_names_the_runs_figures(tiny_lm_dir, tiny_shapes_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/unicode-mllm", "train-tokenizer", "--config", "tiny.yaml"])
    result = TokenizerTrainer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path)).fit()
    card = (result.final_dir / "README.md").read_text()
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    _check_card(card, final, result.final_dir / "train_config.yaml")
    assert "unicode-mllm train-tokenizer --config tiny.yaml" in card
    from unicode_mllm.shard_manifest import read_manifest

    counts = ", ".join(f"{n} {s.num_samples}" for n, s in read_manifest(tiny_shapes_dir).splits.items())
    assert f"| {tiny_shapes_dir} | {counts} |" in card  # the shard folder it read, with its sample counts
    assert "Trained for 6 steps" in card


def test_stage0_and_stage2_cards(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    lm_final = train_lm(load_config(LMTrainConfig, overrides=TINY_LM), tmp_path / "lm")
    card = (lm_final / "README.md").read_text()
    final = json.loads((tmp_path / "lm" / "metrics.json").read_text())
    _check_card(card, final, lm_final / "lm_config.yaml", data_keys=("corpus_tokens",))
    assert "train_samples: 40" in card and "Trained for 4 steps" in card

    result = train_mllm(mllm_config(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path / "mllm"))
    card = (result.final_dir / "README.md").read_text()
    final = json.loads((tmp_path / "mllm" / "final_metrics.json").read_text())
    _check_card(card, final, result.final_dir / "train_config.yaml", data_keys=("data", "data_reader"))
    assert str(tiny_shapes_dir) in card


def test_a_long_run_is_not_called_a_demo():
    from unicode_mllm.stages.mllm import MLLMTrainConfig

    card = render_card("mllm", MLLMTrainConfig(), {"step": 200_000, "loss": 0.5}, command="unicode-mllm x")
    assert "not a capable model" not in card and "| loss | 0.5 |" in card
