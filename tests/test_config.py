from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from unicode_mllm.config import bounded, config_to_dict, dump_config, load_config, parse_override
from unicode_mllm.errors import ConfigError


@dataclass
class QuantCfg:
    depth: int = bounded(2, min=1, max=8)
    stacking: Literal["rq", "hq", "vq"] = "rq"
    decay: float = bounded(0.99, min=0.0, max=1.0)


@dataclass
class OptimCfg:
    lr: float = bounded(1e-3, min=0.0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0


@dataclass
class RunCfg:
    name: str = "run"
    seed: int = 0
    quantizer: QuantCfg = field(default_factory=QuantCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    channels: tuple[int, ...] = bounded((1, 2), min=1)
    note: str | None = None

    def validate(self) -> None:
        if self.quantizer.stacking == "vq" and self.quantizer.depth != 1:
            raise ConfigError(f"quantizer.stacking='vq' needs quantizer.depth=1 (got {self.quantizer.depth})")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_defaults_and_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "seed: 3\nquantizer:\n  depth: 4\noptim:\n  betas: [0.5, 0.9]\n")
    cfg = load_config(RunCfg, p, ["optim.lr=3e-4", "quantizer.stacking=hq", "channels=[1,2,4]"])
    assert cfg.seed == 3 and cfg.quantizer.depth == 4 and cfg.quantizer.stacking == "hq"
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.5, 0.9) and cfg.channels == (1, 2, 4)
    assert config_to_dict(cfg)["channels"] == [1, 2, 4]
    assert "depth: 4" in dump_config(cfg)


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    p = write(tmp_path, "quantizer:\n  detph: 2\n")
    with pytest.raises(
        ConfigError, match=r"cfg.yaml: unknown key 'quantizer.detph' \(did you mean 'quantizer.depth'\?\)"
    ):
        load_config(RunCfg, p)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(RunCfg, None, ["optim.lrr=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"key 'seed' must be int, got 'abc'"):
        load_config(RunCfg, None, ["seed=abc"])
    with pytest.raises(ConfigError, match=r"key 'quantizer.depth' must be int, got 2.5"):
        load_config(RunCfg, None, ["quantizer.depth=2.5"])
    with pytest.raises(ConfigError, match=r"key 'quantizer.stacking' must be one of 'rq', 'hq', 'vq'"):
        load_config(RunCfg, None, ["quantizer.stacking=pq"])
    with pytest.raises(ConfigError, match=r"key 'optim.betas' must have 2 items"):
        load_config(RunCfg, None, ["optim.betas=[0.9]"])


def test_out_of_range_value():
    with pytest.raises(ConfigError, match=r"key 'quantizer.depth' = 9 is out of range \[1, 8\]"):
        load_config(RunCfg, None, ["quantizer.depth=9"])
    with pytest.raises(ConfigError, match=r"key 'channels' = \(1, 0\) is out of range"):
        load_config(RunCfg, None, ["channels=[1, 0]"])


def test_cross_field_validate():
    with pytest.raises(ConfigError, match=r"stacking='vq' needs quantizer.depth=1"):
        load_config(RunCfg, None, ["quantizer.stacking=vq"])
    assert load_config(RunCfg, None, ["quantizer.stacking=vq", "quantizer.depth=1"]).quantizer.depth == 1


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml not found"):
        load_config(RunCfg, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_config(RunCfg, write(tmp_path, "seed: [1,\n"))
    with pytest.raises(ConfigError, match=r"top level must be a mapping"):
        load_config(RunCfg, write(tmp_path, "- 1\n- 2\n"))


def test_override_parsing():
    assert parse_override("a.b=3e-4") == (["a", "b"], 3e-4)
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("note=null") == (["note"], None)
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="is not a section"):
        load_config(RunCfg, None, ["seed.x=1"])


def test_optional_and_bool_strictness():
    assert load_config(RunCfg, None, ["note=hello"]).note == "hello"
    with pytest.raises(ConfigError, match="key 'seed' must be int"):
        load_config(RunCfg, None, ["seed=true"])
