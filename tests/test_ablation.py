"""`eval ablation`: every codebook mode and the no-decompression setting trained and evaluated end to end
(tiny LM and shards from conftest, a few steps), the stage-2 LM hand-over per mode, the table, the CLI checks."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from unicode_mllm.cli import main
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation.ablation import SETTINGS, rows_to_markdown, run_ablation
from unicode_mllm.pipeline import PROFILES, EvalSizes
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

# The smoke profile, sized for conftest's LM (width 32, 512 positions): rq at depth 2 keeps every stage-2
# sample (an 8x8 grid: a T=8 decompression sample reads 64 and writes 128 codes) inside 512 tokens (with hq,
# every decompression sample was over the limit and skipped; stage 2 now refuses that up front).
TEST_PROFILE = dataclasses.replace(
    PROFILES["smoke"],
    tokenizer_overrides=(
        *PROFILES["smoke"].tokenizer_overrides,
        "model.stacking=rq",
        "model.ch_mult=[1,2,2]",
        "model.depth=2",
        "model.z_channels=16",
    ),
    mllm_overrides=(*PROFILES["smoke"].mllm_overrides, "data.max_length=512", "eval.splits=[heldout]"),
    evaluation=EvalSizes(
        tokenizer_images=4,
        photos=(),
        vqa_questions=4,
        vqa_per_image=2,
        t2i_prompts=1,
        batch_size=8,
        gallery=2,
        max_answer_tokens=3,
    ),
)


@pytest.fixture(scope="module")
def ablation(tiny_lm_dir, tiny_shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    rows = run_ablation(out, TEST_PROFILE, lm_dir=tiny_lm_dir, data_dir=tiny_shapes_dir)
    return out, rows


def test_every_setting_is_trained_and_scored(ablation):
    out, rows = ablation
    assert [r["key"] for r in rows] == [s.key for s in SETTINGS]
    for r in rows:
        assert 0.0 <= r["vqa_heldout_exact"] <= 1.0 and 0.0 <= r["t2i_seen_overall"] <= 1.0, r["key"]
        assert math.isfinite(r["psnr_heldout"]) and r["psnr_heldout"] > 0, r["key"]
        assert r["mllm_steps"] == 2 and r["tokenizer_steps"] == 3, r["key"]
        assert r["mllm"]["eval"]["vqa"]["num_questions"] == 4  # greedy answers to the held-out questions
        assert r["mllm"]["eval"]["t2i"]["groups"]["seen"]["num_prompts"] == 1
    # One stage-1 run per codebook mode: the no-decompression row reuses the language-driven tokenizer.
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["dual", "frozen", "language_driven", "separate"]
    by_key = {r["key"]: r for r in rows}
    assert by_key["no_decompression"]["psnr_heldout"] == by_key["language_driven"]["psnr_heldout"]
    tasks = {
        key: yaml.safe_load((out / "mllm" / key / "config.yaml").read_text())["data"]["tasks"]
        for key in ("language_driven", "no_decompression")
    }
    assert tasks["no_decompression"]["decompression"] == 0 and tasks["language_driven"]["decompression"] > 0
    assert json.loads((out / "ablation.json").read_text())["rows"][3]["codebook_mode"] == "separate"


def test_the_table_has_the_papers_layout(ablation):
    out, rows = ablation
    lines = (out / "ablation.md").read_text().splitlines()
    header = (
        "| setting | VQA held-out exact match (%) | T2I overall, seen (%) | T2I shape/colour/position, seen (%) "
        "| recon. PSNR held-out (dB) |"
    )
    assert lines[0].startswith(header)
    body = lines[2 : 2 + len(SETTINGS)]
    assert [line.split(" | ")[0].lstrip("| ") for line in body] == [s.label for s in SETTINGS]
    first = body[0].split(" | ")
    assert first[1] == f"{100 * rows[0]['vqa_heldout_exact']:.1f}"
    assert first[3] == f"{100 * rows[0]['t2i_seen_attributes']:.1f}" and first[4] == f"{rows[0]['psnr_heldout']:.2f}"


def test_stage2_starts_from_the_lm_each_codebook_mode_needs(ablation, tiny_lm_dir):
    out, rows = ablation
    notes = {r["key"]: r["stage2_lm_note"] for r in rows}
    assert notes["language_driven"].startswith("stage-0 LM as it is") and notes["frozen"] == notes["language_driven"]
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).get_input_embeddings().weight.detach()
    for mode in ("dual", "separate"):
        vt = VisualTokenizer.from_pretrained(str(out / "tokenizer" / mode / "final"))
        table = AutoModelForCausalLM.from_pretrained(out / mode / "stage2_lm").get_input_embeddings().weight.detach()
        ids = vt.code_to_token_id
        torch.testing.assert_close(table[ids], vt.quantizer.export_codebook())  # the LM reads the visual codebook
        untouched = torch.ones(base.shape[0], dtype=torch.bool)
        untouched[ids[ids < base.shape[0]]] = False
        assert torch.equal(table[: base.shape[0]][untouched], base[untouched])  # every other row as it was
    separate = VisualTokenizer.from_pretrained(str(out / "tokenizer" / "separate" / "final"))
    assert int(separate.code_to_token_id.min()) >= base.shape[0]  # the codes are new vocabulary ...
    grown = AutoModelForCausalLM.from_pretrained(out / "separate" / "stage2_lm").config.vocab_size
    assert grown == base.shape[0] + separate.config.num_codes  # ... and the LM has a row for each
    assert "grown by" in notes["separate"] and "overwritten" in notes["dual"]


def test_rows_to_markdown_marks_missing_numbers():
    row = {
        "label": "x",
        "vqa_heldout_exact": None,
        "t2i_seen_overall": 0.25,
        "psnr_heldout": 20.123,
        "tokenizer_steps": 1,
        "mllm_steps": 2,
        "stage2_lm_note": "n",
    }
    assert rows_to_markdown([row]).splitlines()[2] == "| x | n/a | 25.0 | n/a | 20.12 | 1 / 2 | n |"
    row["t2i_seen_attributes"] = 0.5
    assert rows_to_markdown([row]).splitlines()[2] == "| x | n/a | 25.0 | 50.0 | 20.12 | 1 / 2 | n |"


def test_rebuild_table_renders_the_stored_rows_again(ablation, capsys):
    out, rows = ablation
    written = (out / "ablation.md").read_text()
    seen = rows[0]["mllm"]["eval"]["t2i"]["groups"]["seen"]
    assert rows[0]["t2i_seen_attributes"] == pytest.approx((seen["shape"] + seen["colour"] + seen["position"]) / 3)
    # A row stored before the graded column existed gets it from its stored evaluation.
    summary = json.loads((out / "ablation.json").read_text())
    for row in summary["rows"]:
        del row["t2i_seen_attributes"]
    (out / "ablation.json").write_text(json.dumps(summary))
    (out / "ablation.md").unlink()
    assert main(["eval", "ablation", "--out", str(out), "--rebuild-table"]) == 0
    assert (out / "ablation.md").read_text() == written
    assert capsys.readouterr().out.rstrip() == written.rstrip()


def test_rebuild_table_needs_a_finished_run(tmp_path, capsys):
    assert main(["eval", "ablation", "--out", str(tmp_path), "--rebuild-table"]) == 2
    assert f"{tmp_path / 'ablation.json'} does not exist" in capsys.readouterr().err


def test_run_ablation_refuses_short_lms_and_unknown_profiles(tiny_lm_dir, tiny_shapes_dir, tmp_path):
    long_samples = dataclasses.replace(TEST_PROFILE, mllm_overrides=("data.max_length=600",))
    with pytest.raises(UserError, match=r"max_position_embeddings=512 but stage 2 builds sequences of up to 600"):
        run_ablation(tmp_path, long_samples, lm_dir=tiny_lm_dir, data_dir=tiny_shapes_dir)
    with pytest.raises(UserError, match=r"ablation profile 'smoke' is unknown; choose one of \['quick', 'full'\]"):
        run_ablation(tmp_path, "smoke")


def test_cli_eval_ablation_checks_its_options(tmp_path, capsys):
    assert main(["eval", "ablation", "--out", str(tmp_path), "--profile", "huge"]) == 2
    assert "--profile 'huge' is unknown" in capsys.readouterr().err
    assert main(["eval", "ablation", "--out", str(tmp_path), "--lm", str(tmp_path / "nope")]) == 2
    assert f"--lm {tmp_path / 'nope'} is not a folder" in capsys.readouterr().err
