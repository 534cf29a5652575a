"""Strict inputs (issue 17, part 2): NaN/inf and repeated keys in configs, environment problems as one-line user
errors (a full disk, a read-only or forbidden output, a refused pickle, a config.json that does not fit its
weights), and the small data fixes (resumed loss window, animated images, symlink loops, `ask --image DIR`,
tokenize's skips in its manifest).

Each test fails on the code before the fix.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import unicode_mllm.cli.inference as cli
from tests.test_bad_input_training import _corrupt_every
from tests.test_lm import TINY
from unicode_mllm.cli import main
from unicode_mllm.config import load_config
from unicode_mllm.errors import ConfigError, UserError
from unicode_mllm.model import UniCodeMLLM
from unicode_mllm.runtime.checkpoint import atomic_write_json
from unicode_mllm.stages.lm import LMTrainConfig, train_lm
from unicode_mllm.stages.mllm.config import MLLMTrainConfig
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

ROOT = Path(__file__).resolve().parents[1]
LM_YAML = ROOT / "configs" / "lm" / "tiny.yaml"
MLLM_YAML = ROOT / "configs" / "mllm" / "tiny.yaml"


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("error:") and err.strip().count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, err


def write_png(path: Path, colour=(200, 30, 30), size=32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def copy(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ----- configs: NaN and inf ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "shown"),
    [
        ("optim.grad_clip=.nan", "optim.grad_clip", "nan"),  # bounded, optional
        ("optim.lr=.nan", "optim.lr", "nan"),  # was an internal error in the optimizer
        ("optim.lr=-.inf", "optim.lr", "-inf"),
        ("optim.weight_decay=1e999", "optim.weight_decay", "inf"),  # an overflowing literal is inf too
        ("train.max_minutes=.inf", "train.max_minutes", "inf"),  # float | None, no upper bound
        ("optim.betas=[0.9, .nan]", "optim.betas[1]", "nan"),  # inside a tuple
        ("data.tasks.vqa=.nan", "data.tasks.vqa", "nan"),  # nested section
    ],
)
def test_non_finite_floats_are_refused_naming_the_file_and_key(override, key, shown):
    with pytest.raises(ConfigError) as err:
        load_config(MLLMTrainConfig, MLLM_YAML, [override])
    assert str(err.value) == f"{MLLM_YAML}: key '{key}' must be a finite number, got {shown}"


def test_non_finite_floats_in_yaml_files_are_refused(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text("optim:\n  min_lr_ratio: .NaN\n")
    with pytest.raises(ConfigError, match=r"nan.yaml: key 'optim.min_lr_ratio' must be a finite number, got nan"):
        load_config(MLLMTrainConfig, path)


def test_cli_refuses_a_nan_grad_clip_instead_of_training_a_nan_lm(capsys, tmp_path):
    sets = [x for s in [*TINY, "optim.grad_clip=.nan"] for x in ("--set", s)]
    code, _, err = run(capsys, "train-lm", "--config", LM_YAML, *sets, "--out", tmp_path / "lm")
    assert_one_line_error(code, err, f"{LM_YAML}: key 'optim.grad_clip' must be a finite number, got nan")
    assert not (tmp_path / "lm" / "model").exists()


# ----- configs: repeated keys and encodings -----------------------------------------------------------------


def test_a_repeated_section_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  ckpt_every: 500\n  steps: 10\noptim:\n  lr: 1.0e-3\ntrain:\n  ckpt_every: 250\n")
    with pytest.raises(ConfigError) as err:
        load_config(MLLMTrainConfig, path)
    assert str(err.value) == f"{path}: key 'train' is written twice (lines 1 and 6); keep one"


def test_a_repeated_nested_key_is_refused(capsys, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  betas: [0.9, 0.95]\n  lr: 2.0e-3\n")
    sets = [x for s in TINY for x in ("--set", s)]  # a short run where the key is taken (before the fix)
    code, _, err = run(capsys, "train-lm", "--config", path, *sets, "--out", tmp_path / "lm")
    assert_one_line_error(code, err, f"{path}: key 'optim.lr' is written twice (lines 2 and 4)")


def test_a_yaml_config_that_is_not_utf8_names_the_file(capsys, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  out_dir: runs/caf\u00e9\n".encode("latin-1"))
    code, _, err = run(capsys, "train-lm", "--config", path, "--out", tmp_path / "lm")
    assert_one_line_error(code, err, f"{path}: not UTF-8 text", "save the config as UTF-8")


# ----- environment errors -----------------------------------------------------------------------------------


def _failing_save(monkeypatch, code: int) -> None:
    """PIL's save raises what the OS says about the output file (as `open` would)."""

    def save(self, fp, *args, **kwargs):
        raise OSError(code, os.strerror(code), os.fspath(fp))

    monkeypatch.setattr(Image.Image, "save", save)


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        (errno.ENOSPC, "no space left on its device; free some space or write to another disk"),
        (errno.EROFS, "it is on a read-only file system; choose an output on a writable disk"),
        (errno.EACCES, "permission denied for"),
        (errno.EPERM, "permission denied for"),
    ],
)
def test_environment_errors_are_one_line_user_errors(
    capsys, monkeypatch, tiny_visual_tokenizer_dir, tmp_path, code, fragment
):
    image = write_png(tmp_path / "in.png")
    _failing_save(monkeypatch, code)
    out = tmp_path / "out"
    exit_code, _, err = run(
        capsys, "reconstruct", image, "--model", tiny_visual_tokenizer_dir, "-o", out, "--lpips-trunk", "none"
    )
    assert_one_line_error(exit_code, err, fragment, str(out / "in_recon.png"))
    assert "internal error" not in err


def test_debug_still_shows_the_traceback(monkeypatch, tiny_visual_tokenizer_dir, tmp_path):
    image = write_png(tmp_path / "in.png")
    _failing_save(monkeypatch, errno.ENOSPC)
    args = ["--debug", "reconstruct", str(image), "--model", str(tiny_visual_tokenizer_dir), "-o", str(tmp_path / "o")]
    with pytest.raises(OSError, match="No space left"):
        main([*args, "--lpips-trunk", "none"])


def test_a_full_disk_inside_safetensors_names_the_file(capsys, monkeypatch, tmp_path):
    """safetensors raises its own error with the errno in the text and no path: the path comes from the frame."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "serialize_file", full)
    sets = [x for s in [*TINY, "train.steps=1", "train.ckpt_every=1"] for x in ("--set", s)]
    code, _, err = run(capsys, "train-lm", "--config", LM_YAML, *sets, "--out", tmp_path / "lm")
    last = err.strip().splitlines()[-1]  # after the corpus and training progress lines
    assert code == 2 and last.startswith("error: cannot write "), err
    assert str(tmp_path / "lm") in last and ".safetensors" in last and "no space left on its device" in last


def test_torch_writer_failure_and_unrelated_errors():
    from unicode_mllm.environment_errors import environment_message

    torch_full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert "check that its disk has free space" in environment_message(torch_full)
    assert environment_message(ValueError("a bug")) is None
    assert environment_message(OSError(errno.ENOENT, "No such file")) is None


class NotATensor:  # a global torch's weights-only unpickler does not allow
    pass


def test_a_pickle_refused_by_the_weights_only_loader_names_the_file(capsys, tiny_mllm_dir, tmp_path):
    folder = copy(tiny_mllm_dir, tmp_path)
    lm = folder / "lm"
    state = load_file(str(lm / "model.safetensors"))
    (lm / "model.safetensors").unlink()
    torch.save({**state, "extra": NotATensor()}, lm / "pytorch_model.bin")
    code, _, err = run(capsys, "ask", "--model", folder, "--device", "cpu", "what is it?")
    assert_one_line_error(code, err, f"{lm / 'pytorch_model.bin'} is a pickle", "weights-only", "NotATensor")
    assert "convert it to safetensors" in err


# ----- config.json that does not fit the weights ------------------------------------------------------------


def test_visual_tokenizer_config_that_does_not_fit_its_weights(capsys, tiny_visual_tokenizer_dir, tmp_path):
    folder = copy(tiny_visual_tokenizer_dir, tmp_path)
    edit_json(folder / "config.json", z_channels=16)
    image = write_png(tmp_path / "in.png")
    code, _, err = run(capsys, "reconstruct", image, "--model", folder, "-o", tmp_path / "o", "--lpips-trunk", "none")
    assert_one_line_error(code, err, f"{folder}: config.json does not fit the weights", "encoder.conv_out.weight")
    assert "[8, 16, 3, 3] in model.safetensors but config.json needs [16, 16, 3, 3]" in err
    assert "LOAD REPORT" not in err


def test_language_model_config_that_does_not_fit_its_weights(tiny_mllm_dir, tmp_path):
    folder = copy(tiny_mllm_dir, tmp_path)
    edit_json(folder / "lm" / "config.json", intermediate_size=96)
    with pytest.raises(UserError) as err:
        UniCodeMLLM.from_pretrained(folder)
    message = str(err.value)
    assert message.startswith(f"{folder / 'lm'}: config.json does not fit the weights: tensor model.layers.0.mlp")
    assert "[64, 32] in model.safetensors but config.json needs [96, 32]" in message


def test_image_size_that_differs_from_the_trained_one_is_refused(capsys, tiny_visual_tokenizer_dir, tmp_path):
    """No tensor records the image size: the training config saved with the weights does."""
    folder = copy(tiny_visual_tokenizer_dir, tmp_path)
    (folder / "train_config.yaml").write_text("model:\n  image_size: 32\n")
    edit_json(folder / "config.json", image_size=64)
    image = write_png(tmp_path / "in.png", size=64)
    code, _, err = run(capsys, "reconstruct", image, "--model", folder, "-o", tmp_path / "o", "--lpips-trunk", "none")
    assert_one_line_error(code, err, "config.json has image_size 64 but the weights were trained at 32")


def test_transformers_load_report_goes_to_the_debug_log(capfd, caplog, tiny_visual_tokenizer_dir, tmp_path):
    folder = copy(tiny_visual_tokenizer_dir, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    save_file({**state, "leftover.weight": torch.zeros(2)}, str(folder / "model.safetensors"), {"format": "pt"})
    VisualTokenizer.from_pretrained(str(folder))
    assert "LOAD REPORT" not in capfd.readouterr().err  # was a table of every differing tensor
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{folder}: the weights differ from the model (1 unexpected); --log-level DEBUG shows which"]
    with caplog.at_level(logging.DEBUG, logger="unicode_mllm"):
        VisualTokenizer.from_pretrained(str(folder))
    assert any("LOAD REPORT" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


# ----- stage 0: the logged loss after a resume --------------------------------------------------------------


def test_first_logged_loss_after_a_resume_averages_the_whole_window(tmp_path):
    cfg = load_config(LMTrainConfig, overrides=[*TINY, "train.log_every=4", "train.eval_every=4"])
    whole = tmp_path / "whole"
    train_lm(cfg, whole)
    crashed = Path(shutil.copytree(whole, tmp_path / "crashed"))
    atomic_write_json(crashed / "checkpoints" / "latest.json", {"name": "step-00000002", "step": 2})
    train_lm(cfg, crashed, resume=True)

    def logged(out_dir):
        return [(r["step"], r["train/loss"]) for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())]

    assert logged(crashed) == logged(whole)  # steps 1-4, not only 3-4


# ----- images -----------------------------------------------------------------------------------------------


def _animated_gif(path: Path) -> Path:
    frames = [Image.new("RGB", (32, 32), c) for c in [(250, 0, 0), (0, 250, 0), (0, 0, 250)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def test_from_folder_counts_gifs_and_warns_about_animated_ones(capsys, tmp_path):
    src = tmp_path / "images"
    write_png(src / "a.png")
    _animated_gif(src / "b.gif")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(src / "c.gif")  # a still GIF: no warning
    code, _, err = run(capsys, "data", "from-folder", src, "--out", tmp_path / "d")
    assert code == 0, err
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    conversion = manifest["extra"]["conversion"]
    assert conversion["num_inputs"] == 3 and conversion["skipped"] == {}
    assert conversion["warned"] == {"animated image: first frame used": 1}
    assert manifest["splits"]["train"]["num_samples"] == 3


def test_eval_folder_counts_symlink_loops_and_dangling_links(tmp_path):
    from unicode_mllm.evaluation.image_sets import ImageSet
    from unicode_mllm.evaluation.skips import SkipCounts

    folder = tmp_path / "images"
    write_png(folder / "ok.png")
    (folder / "self.png").symlink_to("self.png")
    (folder / "a.png").symlink_to("b.png")
    (folder / "b.png").symlink_to("a.png")
    (folder / "gone.png").symlink_to("nothing.png")
    skips = SkipCounts()
    used = [image.name for image in ImageSet.folder(folder).iter(32, skips)]
    assert used == ["ok.png"]
    assert dict(skips.counts) == {"symlink loop": 3, "missing image": 1}
    assert skips.names["symlink loop"] == ["a.png", "b.png", "self.png"]


def test_ask_with_a_folder_as_image_says_it_is_a_folder(capsys, monkeypatch, tmp_path):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the images were checked")

    monkeypatch.setattr(cli, "_load_inference_model", refuse)
    folder = tmp_path / "photos"
    write_png(folder / "cat.png")
    code, _, err = run(capsys, "ask", "--model", tmp_path, "--image", folder, "what is it?")
    assert_one_line_error(code, err, f"--image {folder}: is a folder, not an image file", str(folder / "cat.png"))


def test_tokenize_records_its_skips_in_the_manifest(tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    from unicode_mllm.visual_tokenizer.extract import extract_codes

    corrupt = _corrupt_every(tiny_shapes_dir, tmp_path / "corrupt", every=4)  # 12 of 48 train images
    out = tmp_path / "codes"
    extract_codes(tiny_visual_tokenizer_dir, corrupt, out, ["train", "val"], batch_size=16, device="cpu")
    extra = json.loads((out / "manifest.json").read_text())["extra"]
    assert extra["tokenize"]["skipped"] == {"train": {"corrupt image": 12}, "val": {}}
    assert extra["tokenize"]["broken_shards"] == {"train": [], "val": []}
