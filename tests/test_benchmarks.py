"""The benchmark scripts run end to end at their smallest size (their figures live in BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage2_step_benchmark_reports_one_row(capsys):
    bench = load("bench_stage2_step")
    args = ["--size", "tiny", "--batch", "2", "--seq-len", "16", "--warmup", "0", "--steps", "2", "--device", "cpu"]
    assert bench.main([*args, "--lora", "--activation-checkpointing"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["tokens_per_s"] > 0 and row["steps_timed"] == 2 and row["peak_memory_mib"] > 0
    assert 0 < row["trainable_m"] < row["parameters_m"]  # adapters and embeddings train, the base does not
