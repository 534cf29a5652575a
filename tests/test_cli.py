"""The command line: subcommands listed, data shapes end to end, one-line errors with exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from unicode_mllm.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_subcommands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in ("data", "demo", "train-tokenizer", "reconstruct", "tokenize"):
        assert name in out
    code, out, _ = run(capsys, "data", "--help")
    for name in ("shapes", "from-folder", "from-llava", "inspect", "check-analyser"):
        assert name in out


@pytest.mark.skipif(shutil.which("unicode-mllm") is None, reason="console script not installed")
def test_console_script_entry_point():
    proc = subprocess.run(["unicode-mllm", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "train-tokenizer" in proc.stdout


def test_data_shapes_writes_shards_manifest_and_grid(capsys, tmp_path):
    out_dir = tmp_path / "d"
    code, out, err = run(
        capsys,
        "data",
        "shapes",
        "--out",
        str(out_dir),
        "--train",
        "30",
        "--val",
        "10",
        "--size",
        "32",
        "--shard-size",
        "20",
    )
    assert code == 0, err
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_samples"] == 30 and len(manifest["splits"]["train"]["shards"]) == 2
    assert manifest["splits"]["heldout"]["num_samples"] == 10
    assert manifest["generator_config"]["shapes"]["image_size"] == 32
    assert (out_dir / "samples.png").is_file()
    code, out, err = run(capsys, "data", "inspect", str(out_dir))
    assert code == 0 and "train: 30 samples read" in out
    # a second run into the same folder refuses instead of mixing data
    code, _, err = run(capsys, "data", "shapes", "--out", str(out_dir), "--train", "5", "--val", "0")
    assert code == 2 and err.strip().startswith("error:") and "--overwrite" in err and "\n" not in err.strip()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "shapes", "--out", "X", "--size", "500"], "key 'image_size' = 500 is out of range [32, 256]"),
        (["data", "shapes", "--out", "X", "--set", "colurs=[red]"], "unknown key 'colurs' (did you mean 'colours'?)"),
        (["data", "inspect", "/nonexistent/folder"], "no such data folder"),
        (["reconstruct", "a.png", "--model", "/nonexistent"], "visual tokenizer /nonexistent is not a folder"),
        (["train-tokenizer", "--config", "/nonexistent.yaml"], "config file /nonexistent.yaml not found"),
        (["data", "from-folder", "/nonexistent", "--out", "X"], "image folder /nonexistent not found"),
    ],
)
def test_errors_are_one_line(capsys, tmp_path, args, message):
    code, _, err = run(capsys, *args)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_the_traceback(capsys):
    from unicode_mllm.errors import UserError

    with pytest.raises(UserError):
        main(["--debug", "data", "inspect", "/nonexistent/folder"])


def test_usage_error_exit_code(capsys):
    code, _, err = run(capsys, "data", "shapes")
    assert code == 2 and "--out" in err


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "unicode_mllm.cli", "data", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "shapes" in proc.stdout
