"""The shape of the code base (ARCHITECTURE.md "Layering"): no import circle between packages, no long functions.

A package here is a subpackage of `unicode_mllm` (`unicode_mllm.data`, ...), a top-level module of it
(`unicode_mllm.cli`, ...) or `tokenizer_training`. Every import counts, also one inside a function: a lazy
import hides a circle from Python's import machinery, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("unicode_mllm", "tokenizer_training")
MAX_FUNCTION_LINES = 80
LONG_REASON = "# long:"  # a function over MAX_FUNCTION_LINES says why in a comment starting with this


def _python_files() -> list[Path]:
    return sorted(p for source in SOURCES for p in (ROOT / source).rglob("*.py"))


def _unit(module: str) -> str | None:
    """The package a dotted module name belongs to, None outside the project."""
    parts = module.split(".")
    if parts[0] == "tokenizer_training":
        return "tokenizer_training"
    if parts[0] != "unicode_mllm":
        return None
    return "unicode_mllm" if len(parts) == 1 else f"unicode_mllm.{parts[1]}"


def _imported_modules(path: Path) -> list[str]:
    relative = path.relative_to(ROOT).with_suffix("").parts
    package = list(relative if path.name == "__init__.py" else relative[:-1])
    if path.name == "__init__.py":
        package = package[:-1] if package[-1] == "__init__" else package
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package, one level up per extra dot
                base = package[: len(package) - (node.level - 1)]
                names.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.append(node.module)
    return names


def package_imports() -> dict[str, set[str]]:
    """package -> the other packages its files import."""
    edges: dict[str, set[str]] = {}
    for path in _python_files():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        source = _unit(module)
        for name in _imported_modules(path):
            target = _unit(name)
            if source and target and target != source and target != "unicode_mllm":
                edges.setdefault(source, set()).add(target)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_between_packages():
    edges = package_imports()
    assert "unicode_mllm.data" in edges  # the scan saw the imports
    assert circles(edges) == []


def test_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_over_80_lines_without_a_reason():
    long = []
    for path in _python_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                head = lines[node.lineno - 1 : node.lineno + 15]
                if length > MAX_FUNCTION_LINES and not any(LONG_REASON in line for line in head):
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []
