"""Bad model folders: the wrong kind, a missing path, damaged weights or a broken config give one UserError line.

Each test reproduces a row of the bad-input audit (rows 6, 11-15, 31) and fails on the code before the fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from transformers import PreTrainedModel

from unicode_mllm.cli import main
from unicode_mllm.errors import UserError
from unicode_mllm.model import UniCodeMLLM
from unicode_mllm.runtime.model_folders import (
    LANGUAGE_MODEL,
    MLLM,
    VISUAL_TOKENIZER,
    folder_kind,
    hub_errors,
    looks_local,
)
from unicode_mllm.visual_tokenizer import LanguageCodebook
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

# transformers deprecations (e.g. the KV-cache argument `past_key_values` -> `cache`, removed in 5.40) must
# fail here, not surface in users' terminals.
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


def copy(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def truncate(path: Path, size: int = 500) -> None:
    path.write_bytes(path.read_bytes()[:size])


def assert_one_line_error(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error:") and err.strip().count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, err


# ----- kinds ------------------------------------------------------------------------------------


def test_folder_kinds_are_told_apart(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_mllm_dir):
    assert folder_kind(tiny_lm_dir)[0] == LANGUAGE_MODEL
    assert folder_kind(tiny_visual_tokenizer_dir)[0] == VISUAL_TOKENIZER
    assert folder_kind(tiny_mllm_dir)[0] == MLLM


# ----- rows 6, 15: a language model where a visual tokenizer is expected ---------------------------


def test_lm_folder_is_not_loaded_as_a_random_visual_tokenizer(tiny_lm_dir):
    with pytest.raises(UserError, match=r"is a language model folder \(llama\), not a visual tokenizer; pass"):
        VisualTokenizer.from_pretrained(str(tiny_lm_dir))


def test_from_components_names_an_lm_given_as_the_visual_tokenizer(tiny_lm_dir):
    with pytest.raises(UserError, match=r"language model folder \(llama\), not a visual tokenizer"):
        UniCodeMLLM.from_components(tiny_lm_dir, tiny_lm_dir)


@pytest.mark.parametrize("command", ["reconstruct", "tokenize", "eval tokenizer"])
def test_cli_with_an_lm_folder_as_tokenizer_is_one_error_line(capsys, tiny_lm_dir, tiny_shapes_dir, tmp_path, command):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    args = {
        "reconstruct": ["reconstruct", str(image), "--model", str(tiny_lm_dir), "--lpips-trunk", "none"],
        "tokenize": ["tokenize", "--model", str(tiny_lm_dir), "--shards", str(tiny_shapes_dir)],
        "eval tokenizer": ["eval", "tokenizer", "--tokenizer", str(tiny_lm_dir), "--data", str(tiny_shapes_dir)],
    }[command]
    out = ["-o", str(tmp_path / "out")] if command != "tokenize" else ["--out", str(tmp_path / "out")]
    if command == "eval tokenizer":
        out = ["--lpips-trunk", "none", "--device", "cpu"]
    code = main([*args, *out])
    assert_one_line_error(capsys, code, "is a language model folder (llama), not a visual tokenizer")


# ----- rows 14, 31: other wrong kinds name the folder and what to pass --------------------------------


def test_mllm_folder_as_visual_tokenizer_points_to_its_part(tiny_mllm_dir):
    with pytest.raises(UserError, match=f"UniCodeMLLM folder, not a visual tokenizer; pass {tiny_mllm_dir}/visual_tok"):
        VisualTokenizer.from_pretrained(str(tiny_mllm_dir))


def test_visual_tokenizer_folder_is_not_a_language_model(tiny_lm_dir, tiny_visual_tokenizer_dir):
    with pytest.raises(UserError, match="is a visual tokenizer folder, not a language model"):
        LanguageCodebook.from_pretrained(tiny_visual_tokenizer_dir)
    with pytest.raises(UserError, match="is a visual tokenizer folder, not a language model"):
        UniCodeMLLM.from_components(tiny_visual_tokenizer_dir, tiny_visual_tokenizer_dir)


def test_mllm_folder_as_language_model_points_to_its_lm(tiny_mllm_dir):
    with pytest.raises(UserError, match=f"UniCodeMLLM folder, not a language model; pass {tiny_mllm_dir}/lm"):
        LanguageCodebook.from_pretrained(tiny_mllm_dir)


def test_tokenizer_folder_as_mllm_says_what_it_is(tiny_visual_tokenizer_dir, tmp_path):
    with pytest.raises(UserError, match="it is not a saved UniCodeMLLM but a visual tokenizer folder; pass"):
        UniCodeMLLM.from_pretrained(tiny_visual_tokenizer_dir)
    (tmp_path / "file.png").write_bytes(b"png")
    with pytest.raises(UserError, match=r"file\.png is a file, not a folder"):
        UniCodeMLLM.from_pretrained(tmp_path / "file.png")


def test_mllm_without_lm_weights_or_text_tokenizer(tiny_mllm_dir, tmp_path):
    no_weights = copy(tiny_mllm_dir, tmp_path, "no_weights")
    (no_weights / "lm" / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"lm holds no weights \(model.safetensors\)"):
        UniCodeMLLM.from_pretrained(no_weights)
    no_vocab = copy(tiny_mllm_dir, tmp_path, "no_vocab")
    (no_vocab / "lm" / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="holds tokenizer_config.json but no tokenizer.json"):
        UniCodeMLLM.from_pretrained(no_vocab)


# ----- row 11: a missing local path never goes to the hub ----------------------------------------------


def test_paths_that_look_local_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("org/name")
    assert all(looks_local(p) for p in ("nope", "./nope", "/abs/nope", "a/b/c", "org/", "~/x"))
    (tmp_path / "runs").mkdir()
    assert looks_local("runs/lm")  # its parent folder exists here


def test_mllm_without_its_visual_tokenizer_folder(tiny_mllm_dir, tmp_path):
    model = copy(tiny_mllm_dir, tmp_path)
    shutil.rmtree(model / "visual_tokenizer")
    with pytest.raises(UserError, match="is missing its visual tokenizer folder .*visual_tokenizer; re-copy"):
        UniCodeMLLM.from_pretrained(model)


def test_missing_lm_paths_fail_at_once(tiny_visual_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="language model nope is not a folder"):
        UniCodeMLLM.from_components("nope", tiny_visual_tokenizer_dir)
    with pytest.raises(UserError, match="language model nope_lm is not a folder"):
        LanguageCodebook.from_pretrained("nope_lm")
    with pytest.raises(UserError, match="visual tokenizer nope is not a folder"):
        VisualTokenizer.from_pretrained("nope")


def test_unreachable_hub_id_is_one_line(monkeypatch):
    def offline(cls, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(offline))
    with pytest.raises(UserError, match="org/vt is not a local folder and not reachable on the hub: We couldn't"):
        VisualTokenizer.from_pretrained("org/vt")
    fails = pytest.raises(
        UserError, match=r"^language model org/x is not a local .*connect to 'https://huggingface.co'"
    )
    with fails, hub_errors("org/x", LANGUAGE_MODEL):
        raise OSError("We couldn't connect to 'https://huggingface.co'")


# ----- row 12: damaged safetensors -------------------------------------------------------------------


def test_truncated_visual_tokenizer_weights(tiny_visual_tokenizer_dir, tmp_path):
    folder = copy(tiny_visual_tokenizer_dir, tmp_path)
    truncate(folder / "model.safetensors")
    with pytest.raises(UserError, match=r"model.safetensors is damaged \(SafetensorError: .*\); re-copy or re-save"):
        VisualTokenizer.from_pretrained(str(folder))


def test_garbage_lm_weights_in_mllm_and_in_codebook_llm(tiny_mllm_dir, tmp_path):
    model = copy(tiny_mllm_dir, tmp_path)
    (model / "lm" / "model.safetensors").write_bytes(b"\xff" * 4096)
    with pytest.raises(UserError, match=r"lm/model.safetensors is damaged \(SafetensorError"):
        UniCodeMLLM.from_pretrained(model)
    with pytest.raises(UserError, match=r"lm/model.safetensors is damaged \(SafetensorError"):
        LanguageCodebook.from_pretrained(model / "lm")


def test_cli_ask_with_truncated_lm_is_one_error_line(capsys, tiny_mllm_dir, tmp_path):
    model = copy(tiny_mllm_dir, tmp_path)
    truncate(model / "lm" / "model.safetensors", 1000)
    code = main(["ask", "--model", str(model), "where?", "--device", "cpu"])
    assert_one_line_error(capsys, code, "model.safetensors is damaged (SafetensorError")


# ----- row 13: broken JSON and wrong-typed values ------------------------------------------------------


def test_broken_mllm_json_files_name_the_file(tiny_mllm_dir, tmp_path):
    model = copy(tiny_mllm_dir, tmp_path)
    (model / "unicode_mllm.json").write_text('{"format_version": 1, "reading": ')
    with pytest.raises(UserError, match=r"unicode_mllm.json is not valid JSON \(Expecting value"):
        UniCodeMLLM.from_pretrained(model)
    lm_config = copy(tiny_mllm_dir, tmp_path, "lm_config")
    (lm_config / "lm" / "config.json").write_text("garbage{{")
    with pytest.raises(UserError, match=r"lm/config.json is not valid JSON"):
        UniCodeMLLM.from_pretrained(lm_config)


def test_wrong_typed_mllm_json_value_names_the_key(tiny_mllm_dir, tmp_path):
    model = copy(tiny_mllm_dir, tmp_path)
    config = json.loads((model / "unicode_mllm.json").read_text())
    config["code_shape"] = "8x8x2"
    (model / "unicode_mllm.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"unicode_mllm.json: code_shape must be 3 positive ints .*'8x8x2'"):
        UniCodeMLLM.from_pretrained(model)


def test_visual_tokenizer_config_errors_name_the_file(tiny_visual_tokenizer_dir, tiny_mllm_dir, tmp_path):
    broken = copy(tiny_visual_tokenizer_dir, tmp_path, "broken")
    (broken / "config.json").write_text('{"a":')
    with pytest.raises(UserError, match=r"config.json is not valid JSON"):
        VisualTokenizer.from_pretrained(str(broken))
    model = copy(tiny_mllm_dir, tmp_path, "mllm")
    (model / "visual_tokenizer" / "config.json").write_text('{"image_size": "big"}')
    with pytest.raises(UserError, match=r"visual_tokenizer/config.json: image_size must be int, got 'big'"):
        UniCodeMLLM.from_pretrained(model)
