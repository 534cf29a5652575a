"""Every ```python block of README.md runs in a fresh namespace; `x = ...  # (a, b)` shape comments are asserted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
SHAPE_COMMENT = re.compile(r"^(\w+)\s*=.*#\s*\(([\d,\s]+)\)\s*$")


def with_shape_asserts(code: str) -> str:
    out = []
    for line in code.splitlines():
        out.append(line)
        match = SHAPE_COMMENT.match(line)
        if match:
            name, dims = match.group(1), tuple(int(d) for d in match.group(2).split(",") if d.strip())
            out.append(f"assert tuple({name}.shape) == {dims}, ({name!r}, tuple({name}.shape))")
    return "\n".join(out)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    code = with_shape_asserts(BLOCKS[index])
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "readme"})


YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_yaml_snippets_are_valid_config_sections():
    """The "Your own data" snippets: the stage-2 sources replace the tiny preset's data.shards, and the image policy
    is a valid stage-1 and stage-2 data section."""
    import yaml

    from unicode_mllm.config import config_from_dict
    from unicode_mllm.stages.mllm import MLLMTrainConfig
    from unicode_mllm.stages.tokenizer.config import TokenizerTrainConfig

    stage2 = next(b for b in YAML_BLOCKS if "my_stage2.yaml" in b)
    preset = yaml.safe_load((README.parent / "configs/mllm/tiny.yaml").read_text())
    snippet = yaml.safe_load(stage2)
    del preset["data"]["shards"]
    preset["data"].update(snippet["data"])
    preset["eval"].update(snippet["eval"])
    cfg = config_from_dict(MLLMTrainConfig, preset)
    assert [s.name for s in cfg.data.resolved_sources()] == ["llava", "coco", "vqav2", "shapes"]
    policy = yaml.safe_load(next(b for b in YAML_BLOCKS if "resize: auto" in b))
    assert config_from_dict(TokenizerTrainConfig, policy).data.image.resize == "auto"
    assert config_from_dict(MLLMTrainConfig, policy).data.image.crop_scale == (0.8, 1.0)
