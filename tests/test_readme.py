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
