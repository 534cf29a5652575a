"""The README's main job runs end to end (smoke profile: every stage, a few samples and steps), plus the
pieces it is built from: the time budget, the profiles' configs, the VQA question spread, the report."""

from __future__ import annotations

import json
import time

import pytest
from PIL import Image

from unicode_mllm.cli import main
from unicode_mllm.demo import run_demo
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation import SkipCounts
from unicode_mllm.evaluation.stage_evaluation import spread_vqa_items
from unicode_mllm.pipeline import MIN_STAGE_MINUTES, PROFILES, TimeBudget, check_lm_positions, load_stage_configs
from unicode_mllm.report import Section, write_report


def test_demo_smoke_writes_the_report(tmp_path):
    metrics = run_demo(tmp_path, profile_name="smoke")
    assert set(metrics["stages"]) == {"data", "analyser", "lm", "tokenizer", "mllm"}
    assert metrics["stages"]["data"]["train"] == 32
    assert metrics["stages"]["tokenizer"]["step"] == 3
    assert metrics["stages"]["tokenizer"]["rel_distance"] < 1e-6  # the ramp ended on C_L
    mllm = metrics["stages"]["mllm"]
    assert mllm["step"] == 2 and 0.0 <= mllm["heldout/vqa_exact"] <= 1.0  # stage 2 ran and was evaluated
    assert 0 < mllm["max_minutes"] <= 2  # the smoke override, possibly lowered by the budget

    evaluation = metrics["eval"]
    for split in ("val", "heldout"):
        assert evaluation["tokenizer"][split]["num_images"] == 8  # tokenizer_images of the 16 per split
        assert evaluation["tokenizer"][split]["psnr"] > 0 and 0 < evaluation["tokenizer"][split]["ssim"] <= 1
    photos = evaluation["tokenizer"]["photos"]
    assert photos["num_images"] == 1 if photos["available"] else "scikit-image" in photos["reason"]
    vqa = evaluation["vqa"]
    assert vqa["split"] == "heldout" and vqa["num_questions"] == 6 and 0.0 <= vqa["accuracy"] <= 1.0
    assert vqa["decoding"] == {"max_new_tokens": 4, "temperature": 0.0}  # greedy
    t2i = evaluation["t2i"]
    assert {g: t2i["groups"][g]["num_prompts"] for g in ("seen", "heldout")} == {"seen": 2, "heldout": 2}
    assert 0.0 <= t2i["groups"]["seen"]["overall"] <= 1.0
    assert t2i["sampling"]["temperature"] == 1.0 and t2i["sampling"]["top_k"] == 50

    report = tmp_path / "report"
    page = (report / "index.html").read_text()
    for title in (
        "Shapes data",
        "Stage 0",
        "Stage 1",
        "Stage 2: the MLLM",
        "Evaluation: reconstruction",
        "Evaluation: held-out VQA",
        "Evaluation: text-to-image",
    ):
        assert title in page
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["profile"] == "smoke" and saved["eval"]["vqa"]["num_questions"] == 6
    images = {p.name for p in (report / "images").iterdir()}
    assert any(name.startswith("recon-") for name in images)
    # Training curves of all three stages (stage 1 and 2 both write curves.png: neither may hide the other).
    assert {"loss_curve.png", "curves.png", "curves-2.png"} <= images
    assert {"reconstructions-heldout.png", "vqa-answers.png", "t2i-generations.png"} <= images
    assert 'src="images/vqa-answers.png"' in page and 'src="images/curves-2.png"' in page
    # The answered-questions figure: one thumbnail per image (6 questions, 2 per image -> 3 images).
    assert Image.open(report / "images" / "vqa-answers.png").width == 3 * (128 + 8)


def test_time_budget_lowers_stage_caps_to_what_is_left():
    budget = TimeBudget(total_minutes=30.0)
    assert budget.stage_minutes(9.0, reserve_minutes=15.0) == 9.0  # 30 left - 15 reserved > 9
    assert budget.stage_minutes(None, reserve_minutes=10.0) == pytest.approx(20.0, abs=0.01)
    late = TimeBudget(total_minutes=30.0, started=time.perf_counter() - 25 * 60)  # 25 minutes gone
    assert late.stage_minutes(12.0, reserve_minutes=3.0) == pytest.approx(2.0, abs=0.01)
    assert late.stage_minutes(12.0, reserve_minutes=10.0) == MIN_STAGE_MINUTES  # over: the shortest run
    assert TimeBudget(total_minutes=None).stage_minutes(7.0, reserve_minutes=100.0) == 7.0


def test_profiles_guard_their_stages_and_give_the_lm_enough_positions():
    for name, profile in PROFILES.items():
        lm_cfg, tokenizer_cfg, mllm_cfg = load_stage_configs(profile)
        assert lm_cfg.model.max_position_embeddings >= mllm_cfg.data.max_length, name
        assert mllm_cfg.train.max_minutes is not None, name  # run_demo needs it to share the total budget
        if profile.total_minutes is not None and tokenizer_cfg.train.max_minutes is not None:
            caps = tokenizer_cfg.train.max_minutes + mllm_cfg.train.max_minutes + profile.eval_reserve_minutes
            assert caps <= profile.total_minutes, name
    lm_cfg, _, _ = load_stage_configs(PROFILES["smoke"])
    assert lm_cfg.model.hidden_size == 32 and lm_cfg.train.steps == 4  # the profile's own overrides are kept


def test_check_lm_positions_names_the_fix(tiny_lm_dir):
    check_lm_positions(tiny_lm_dir, 512)
    with pytest.raises(UserError, match=r"max_position_embeddings=512 .* --set model.max_position_embeddings=576"):
        check_lm_positions(tiny_lm_dir, 576)


def test_spread_vqa_items_caps_questions_per_image(tiny_shapes_dir):
    skips = SkipCounts()
    items = spread_vqa_items(tiny_shapes_dir, "heldout", limit=10, per_image=3, skips=skips)
    images = [item.source.rsplit("#", 1)[0] for item in items]
    assert len(items) == 10 and len(set(images)) == 4  # 3 + 3 + 3 + 1
    assert len({item.source for item in items}) == 10  # no question twice
    assert [images.count(name) for name in dict.fromkeys(images)] == [3, 3, 3, 1]
    assert len({item.kind for item in items}) >= 3 and skips.total == 0
    first_two = spread_vqa_items(tiny_shapes_dir, "heldout", limit=2, per_image=1, skips=SkipCounts())
    assert first_two[0].source.endswith("#0") and first_two[1].source.endswith("#1")  # image k starts at question k


def test_report_keeps_files_of_the_same_name_apart(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    Image.new("RGB", (2, 2), (255, 0, 0)).save(a / "curves.png")
    Image.new("RGB", (3, 3), (0, 0, 255)).save(b / "curves.png")
    sections = [Section("one", images=[(a / "curves.png", "a")]), Section("two", images=[(b / "curves.png", "b")])]
    sections.append(Section("again", images=[(a / "curves.png", "a again")]))
    page = write_report(tmp_path / "report", "t", sections, {"x": 1}).read_text()
    assert Image.open(tmp_path / "report" / "images" / "curves.png").size == (2, 2)
    assert Image.open(tmp_path / "report" / "images" / "curves-2.png").size == (3, 3)
    assert page.count('src="images/curves.png"') == 2 and page.count('src="images/curves-2.png"') == 1


def test_cli_demo_rejects_conflicting_or_unknown_profiles(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quick", "--profile", "full"]) == 2
    assert "--quick is the quick profile" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--profile", "tiny"]) == 2
    assert "demo profile 'tiny' is unknown; choose one of ['full', 'quick', 'smoke']" in capsys.readouterr().err
