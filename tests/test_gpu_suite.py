"""The GPU kit (benchmarks/gpu_suite.py) runs every section at toy size on the CPU, so it cannot rot before a GPU
is lent: finite figures in every section, errors and time caps recorded per section; and the small presets load."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

from unicode_mllm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))  # as `python benchmarks/gpu_suite.py` has it

# The figures each section must produce on any device (MFU and bounds need a datasheet row: tested below).
EXPECTED = {
    "stages_bf16": [f"stage{k}_{what}" for k in range(3) for what in ("steps_per_s", "final_loss")],
    "small_preset": ["lm_parameters", "heldout_vqa_greedy", "t2i_whole_scene_seen", "t2i_whole_scene_heldout"],
    "quantizer": ["native_median_step", "library_median_step", "native_tokens_per_s", "native_peak_step_memory"],
    "tokenizer_throughput": ["encode_images_per_s", "decode_images_per_s", "round_trip_images_per_s"],
    "lora_step": ["checkpointing_tokens_per_s", "no_checkpointing_tokens_per_s", "checkpointing_flops_per_token"],
    "image_decoding": ["b1_cfg1_tokens_per_s", "b2_cfg3_tokens_per_s", "b1_cfg1_ms_per_forward"],
}


def kit(name: str):
    return importlib.import_module(f"gpu_kit.{name}")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_kit")
    code = kit("runner").main(["--out", str(out), "--cpu-smoke"])
    return code, json.loads((out / "gpu_suite.json").read_text()), out


def assert_finite(section: dict) -> None:
    assert section["figures"], section["name"]
    for figure in section["figures"]:
        value = figure["value"]
        assert isinstance(value, (int, float)) and math.isfinite(value), (section["name"], figure)
        assert figure["unit"], figure


def test_cpu_smoke_runs_every_section_with_finite_figures(smoke):
    code, suite, out = smoke
    assert [s["name"] for s in suite["sections"]] == list(kit("plan").SECTION_NAMES)
    for section in suite["sections"]:
        assert section["status"] == "ok", (section["name"], section.get("error"))
        assert_finite(section)
        names = {f["name"] for f in section["figures"]}
        assert set(EXPECTED[section["name"]]) <= names, (section["name"], sorted(names))
        assert section["how"] and section["settings"]
    assert code == 0 and suite["mode"] == "cpu-smoke" and suite["summary"] == {"ok": len(EXPECTED)}
    assert suite["device"]["name"] and suite["software"]["torch"] and suite["software"]["transformers"]
    page = (out / "gpu_suite.md").read_text()
    assert all(f"## {name}:" in page for name in EXPECTED) and "| heldout_vqa_greedy |" in page


def test_mfu_and_bandwidth_bounds_are_computed_against_the_datasheet_row(tmp_path, monkeypatch):
    chips = kit("chips")
    spec = chips.ChipSpec("test chip", 1.0, 0.001)  # any row exercises the formulas (a CPU has none)
    monkeypatch.setattr(chips, "chip_spec", lambda name: spec)
    assert kit("runner").main(["--out", str(tmp_path), "--cpu-smoke", "--only", "lora_step,image_decoding"]) == 0
    suite = json.loads((tmp_path / "gpu_suite.json").read_text())
    names = {f["name"]: f for s in suite["sections"] for f in s["figures"]}
    for name in ("checkpointing_mfu", "no_checkpointing_mfu_as_full_finetune", "b2_cfg3_with_kv_bound"):
        assert math.isfinite(names[name]["value"]) and names[name]["value"] > 0, name
    assert names["b1_cfg1_with_kv_bound"]["value"] < names["b1_cfg1_weights_bound"]["value"]
    for section in suite["sections"]:
        assert_finite(section)


def test_chip_table_matches_the_lent_cards():
    chips = kit("chips")
    assert chips.chip_spec("NVIDIA H100 80GB HBM3").bf16_dense_tflops == 989.0
    assert chips.chip_spec("NVIDIA H100 80GB HBM3").hbm_tb_per_s == 3.35
    assert chips.chip_spec("NVIDIA H200").hbm_tb_per_s == 4.8
    assert chips.chip_spec("NVIDIA H100 PCIe").label == "H100 PCIe"
    assert chips.chip_spec("AMD EPYC 7B13") is None


def test_lora_flops_count_the_adapters_peft_builds():
    import bench_stage2_step as bench
    import torch

    flops = kit("flops")
    lm = bench.build_lm("tiny", 16, torch.device("cpu"), lora=True, checkpointing=False)
    adapters = sum(p.numel() for n, p in lm.named_parameters() if "lora_" in n)
    assert adapters == flops.lora_params(bench.SHAPES["tiny"], r=128)
    shape_7b = bench.SHAPES["7b"]
    assert abs(flops.linear_params(shape_7b) - 6.61e9) < 0.01e9  # LLaMA-2-7B's matmul weights, LM head included


def test_out_of_memory_falls_back_to_smaller_batches_then_shapes_and_says_so(tmp_path, monkeypatch):
    import bench_stage2_step as bench
    import torch

    timed = bench.time_steps

    def time_steps(lm, batch, *args):  # the tiny shape never fits; "micro" fits at batch 1 only
        if lm.get_input_embeddings().weight.shape[1] == bench.SHAPES["tiny"]["hidden_size"] or batch > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        return timed(lm, batch, *args)

    monkeypatch.setattr(bench, "time_steps", time_steps)
    micro = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, vocab_size=300)
    monkeypatch.setitem(bench.SHAPES, "micro", micro)
    settings = kit("plan").get_plan("lora_step").cpu_smoke
    monkeypatch.setitem(settings, "shapes", ["tiny", "micro"])
    monkeypatch.setitem(settings, "checkpointing", [True])
    assert kit("runner").main(["--out", str(tmp_path), "--cpu-smoke", "--only", "lora_step"]) == 0
    (section,) = json.loads((tmp_path / "gpu_suite.json").read_text())["sections"]
    tokens = next(f for f in section["figures"] if f["name"] == "checkpointing_tokens_per_s")
    assert tokens["settings"]["shape"] == "micro" and tokens["settings"]["batch"] == 1
    assert tokens["settings"]["fallback"] is True and tokens["settings"]["asked"] == "tiny at batch 2"
    notes = "\n".join(section["notes"])
    assert "tiny batch 2 x 32: OutOfMemoryError: CUDA out of memory" in notes and "FALLBACK to micro" in notes


def test_an_error_in_one_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("the quantizer fell over\nsecond line")

    monkeypatch.setattr(kit("sections.quantizer"), "run", broken)
    code = kit("runner").main(["--out", str(tmp_path), "--cpu-smoke", "--only", "quantizer,tokenizer_throughput"])
    suite = json.loads((tmp_path / "gpu_suite.json").read_text())
    first, second = suite["sections"]
    assert code == 1 and first["status"] == "error" and first["error"] == "RuntimeError: the quantizer fell over"
    assert second["status"] == "ok" and second["figures"]


def test_a_section_past_its_time_cap_is_killed_and_recorded(tmp_path):
    record = kit("runner").run_isolated("quantizer", "cpu-smoke", tmp_path, timeout=1.0)  # still importing torch
    assert record["status"] == "timeout" and "time cap" in record["error"]


def test_unknown_section_names_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        kit("runner").main(["--out", str(tmp_path), "--only", "quantiser"])
    assert "section 'quantiser' is unknown" in capsys.readouterr().err


def test_small_presets_load_and_validate():
    from unicode_mllm.stages.lm import LMTrainConfig
    from unicode_mllm.stages.mllm import MLLMTrainConfig
    from unicode_mllm.stages.tokenizer.config import TokenizerTrainConfig

    configs = ROOT / "configs"
    lm = load_config(LMTrainConfig, configs / "lm" / "small.yaml")
    tok = load_config(TokenizerTrainConfig, configs / "tokenizer" / "small.yaml")
    mllm = load_config(MLLMTrainConfig, configs / "mllm" / "small.yaml")
    m = lm.model
    per_layer = 4 * m.hidden_size**2 + 3 * m.hidden_size * m.intermediate_size
    assert 10e6 < m.num_hidden_layers * per_layer < 100e6  # "tens of millions of parameters"
    assert tok.model.image_size == 64 and tok.model.z_channels == m.hidden_size
    assert mllm.data.max_length <= m.max_position_embeddings
    plan = kit("plan").get_plan("small_preset").gpu
    caps = tok.train.max_minutes + mllm.train.max_minutes + plan["eval_reserve_minutes"]
    assert caps < plan["total_minutes"]  # the demo's TimeBudget leaves stage 0 and the data the rest
    for text in (configs / d / "small.yaml" for d in ("lm", "tokenizer", "mllm")):
        assert "NOT RUN ON A GPU YET" in text.read_text()
