"""Hugging Face Auto classes: saved UniCodeMLLM and visual tokenizer folders load through transformers.AutoModel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from unicode_mllm.hf_auto import AUTO_MODULE, UniCodeMLLMHFConfig, VisualTokenizerConfig
from unicode_mllm.model import UniCodeMLLM
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_saved_folders_carry_model_type_auto_map_and_the_loader_file(tiny_mllm_dir, tiny_visual_tokenizer_dir):
    mllm = json.loads((tiny_mllm_dir / "config.json").read_text())
    assert mllm["model_type"] == "unicode_mllm" and mllm["mllm_config"] == "unicode_mllm.json"
    assert mllm["auto_map"]["AutoModel"] == f"{AUTO_MODULE}.UniCodeMLLMAuto"
    vt = json.loads((tiny_visual_tokenizer_dir / "config.json").read_text())
    assert vt["model_type"] == "unicode_visual_tokenizer"
    assert vt["auto_map"]["AutoConfig"] == f"{AUTO_MODULE}.VisualTokenizerConfig"
    for folder in (tiny_mllm_dir, tiny_visual_tokenizer_dir):
        assert (folder / f"{AUTO_MODULE}.py").is_file()


def test_automodel_loads_both_kinds(tiny_mllm_dir, tiny_visual_tokenizer_dir):
    assert isinstance(AutoConfig.from_pretrained(tiny_mllm_dir), UniCodeMLLMHFConfig)
    assert isinstance(AutoConfig.from_pretrained(tiny_visual_tokenizer_dir), VisualTokenizerConfig)
    direct = UniCodeMLLM.from_pretrained(tiny_mllm_dir)
    for auto in (AutoModel, AutoModelForCausalLM):
        model = auto.from_pretrained(tiny_mllm_dir)
        assert isinstance(model, UniCodeMLLM) and _same_weights(model, direct)
        assert model.config == direct.config
    vt = AutoModel.from_pretrained(tiny_visual_tokenizer_dir)
    assert isinstance(vt, VisualTokenizer)
    assert _same_weights(vt, VisualTokenizer.from_pretrained(tiny_visual_tokenizer_dir))


def test_folders_saved_before_config_json_still_load(tiny_mllm_dir, tiny_visual_tokenizer_dir, tmp_path):
    """Yesterday's layout: a UniCodeMLLM folder with unicode_mllm.json only, a tokenizer config.json without
    auto_map, no loader file."""
    old_vt = tmp_path / "vt"
    shutil.copytree(tiny_visual_tokenizer_dir, old_vt)
    (old_vt / f"{AUTO_MODULE}.py").unlink()
    config = json.loads((old_vt / "config.json").read_text())
    del config["auto_map"]
    (old_vt / "config.json").write_text(json.dumps(config, indent=2))
    old = tmp_path / "mllm"
    shutil.copytree(tiny_mllm_dir, old)
    for name in ("config.json", f"{AUTO_MODULE}.py"):
        (old / name).unlink()
    mllm_json = json.loads((old / "unicode_mllm.json").read_text())
    mllm_json["visual_tokenizer"] = str(old_vt)
    (old / "unicode_mllm.json").write_text(json.dumps(mllm_json, indent=2))
    shutil.rmtree(old / "visual_tokenizer")

    model = UniCodeMLLM.from_pretrained(old)
    assert _same_weights(model, UniCodeMLLM.from_pretrained(tiny_mllm_dir))
    assert isinstance(AutoModel.from_pretrained(old_vt), VisualTokenizer)
    assert isinstance(VisualTokenizer.from_pretrained(old_vt), VisualTokenizer)


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize("route", ["import unicode_mllm first", "trust_remote_code"])
def test_a_fresh_process_loads_through_automodel(route, tiny_mllm_dir, tiny_visual_tokenizer_dir):
    """`import unicode_mllm` before transformers registers (the import hook); trust_remote_code=True needs no
    import at all (the folder's loader file imports the installed package; offline)."""
    if route == "trust_remote_code":
        head, kwargs = "", "trust_remote_code=True"
    else:
        head, kwargs = "import unicode_mllm\n", ""
    body = f"""
        from transformers import AutoModel
        vt = AutoModel.from_pretrained({str(tiny_visual_tokenizer_dir)!r}, {kwargs})
        mllm = AutoModel.from_pretrained({str(tiny_mllm_dir)!r}, {kwargs})
        print(type(vt).__name__, type(mllm).__name__)
        """
    done = _python(head + textwrap.dedent(body))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["VisualTokenizer", "UniCodeMLLM"]


def test_without_the_import_or_trust_remote_code_transformers_says_what_to_do(tiny_mllm_dir):
    done = _python(f"from transformers import AutoModel; AutoModel.from_pretrained({str(tiny_mllm_dir)!r})")
    assert done.returncode != 0 and "trust_remote_code" in done.stderr


def test_import_unicode_mllm_stays_light():
    done = _python("import sys, unicode_mllm, unicode_mllm.cli; print('transformers' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
