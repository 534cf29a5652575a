"""The README's main job runs end to end (smoke profile: every stage, a few samples and steps)."""

from __future__ import annotations

import json

from unicode_mllm.demo import run_demo


def test_demo_smoke_writes_the_report(tmp_path):
    metrics = run_demo(tmp_path, profile_name="smoke")
    assert set(metrics["stages"]) == {"data", "analyser", "lm", "tokenizer"}
    assert metrics["stages"]["data"]["train"] == 32
    assert metrics["stages"]["tokenizer"]["step"] == 3
    assert metrics["stages"]["tokenizer"]["rel_distance"] < 1e-6  # the ramp ended on C_L
    page = (tmp_path / "report" / "index.html").read_text()
    for title in ("Shapes data", "Stage 0", "Stage 1"):
        assert title in page
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["profile"] == "smoke"
    assert any((tmp_path / "report" / "images").glob("recon-*.png"))
