from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_lm import TINY
from tests.test_mllm_training import make_config
from unicode_mllm.config import dump_config, load_config
from unicode_mllm.errors import UserError
from unicode_mllm.runtime import checkpoint as ckpt
from unicode_mllm.runtime.checkpoint import (
    CheckpointLayout,
    CheckpointManager,
    atomic_write_text,
    join_tensors,
    save_tensors,
    split_tensors,
)
from unicode_mllm.runtime.run_lock import RunLock


@pytest.fixture
def mllm_cfg(tiny_lm_dir, tiny_visual_tokenizer_dir, tiny_shapes_dir):
    def build(out_dir, shapes_dir=tiny_shapes_dir, **sections):
        return make_config(tiny_lm_dir, tiny_visual_tokenizer_dir, shapes_dir, out_dir, **sections)

    return build


def test_atomic_write_crash_keeps_old_file(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")

    def crash(tmp):
        tmp.write_text("half-writ")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        ckpt.atomic_write(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind


def test_safetensors_crash_mid_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"w": torch.ones(3)})

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)  # a truncated file
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_tensors(path, {"w": torch.zeros(3)})
    assert torch.equal(load_file(str(path))["w"], torch.ones(3))


def test_shared_tensors_are_saved(tmp_path):
    shared = torch.randn(4, 2)
    save_tensors(tmp_path / "m.safetensors", {"a": shared, "b": shared, "c": shared[1:]})
    out = load_file(str(tmp_path / "m.safetensors"))
    assert torch.equal(out["a"], shared) and torch.equal(out["b"], shared) and torch.equal(out["c"], shared[1:])


def test_split_join_roundtrip_optimizer_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    tree, tensors = split_tensors(opt.state_dict(), "optimizer")
    json.dumps(tree)  # JSON-safe
    back = join_tensors(json.loads(json.dumps(tree)), tensors)
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    opt2.load_state_dict(back)
    assert opt2.param_groups[0]["lr"] == 1e-3 and opt2.param_groups[0]["weight_decay"] == 0.1
    assert torch.equal(
        opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"], opt.state[opt.param_groups[0]["params"][0]]["exp_avg"]
    )


def test_manager_save_load_prune_and_crash(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    for step in (10, 20, 30):
        mgr.save(step, {"model": {"w": torch.full((2,), float(step))}}, {"note": step})
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("step-*"))
    assert names == ["step-00000020", "step-00000030"]
    loaded = mgr.load()
    assert loaded.step == 30 and loaded.state["note"] == 30
    assert torch.equal(loaded.tensors["model"]["w"], torch.full((2,), 30.0))

    def boom(*a, **k):
        raise OSError("killed")

    monkeypatch.setattr(ckpt, "atomic_write_json", boom)
    with pytest.raises(OSError):
        mgr.save(40, {"model": {"w": torch.zeros(2)}}, {})
    assert mgr.load().step == 30  # the pointer and the old checkpoint survive
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ckpt").iterdir())


def test_manager_errors(tmp_path):
    mgr = CheckpointManager(tmp_path)
    assert mgr.latest() is None
    with pytest.raises(UserError, match="no checkpoint in"):
        mgr.load()
    (tmp_path / "latest.json").write_text("{broken")
    with pytest.raises(UserError, match="latest.json is damaged"):
        mgr.latest()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="is damaged"):
        ckpt.load_tensors(bad)


def test_renamed_files_and_checkpoints_get_umask_modes(tmp_path):
    """mkstemp/mkdtemp make 0600/0700 entries; after the rename they must read like plain writes (0644/0755)."""
    plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
    plain_file.write_text("x")
    plain_dir.mkdir()
    atomic_write_text(tmp_path / "atomic.json", "{}")
    saved = CheckpointManager(tmp_path / "ckpts").save(3, {"model": {"w": torch.zeros(2)}}, {"note": 1})
    mode = stat.S_IMODE
    assert mode((tmp_path / "atomic.json").stat().st_mode) == ckpt.FILE_MODE == mode(plain_file.stat().st_mode)
    assert mode(saved.stat().st_mode) == ckpt.DIR_MODE == mode(plain_dir.stat().st_mode)
    assert mode((saved / "state.json").stat().st_mode) == ckpt.FILE_MODE
    assert mode((tmp_path / "ckpts" / "latest.json").stat().st_mode) == ckpt.FILE_MODE


# ----- issue 17: a step folder is checked whole; re-saves swap whole folders; dead writers' temp folders go ---------


def _layout() -> CheckpointLayout:
    return CheckpointLayout(
        tensors={"model": {"w": (2,)}, "disc": {"d": (3,)}, "optimizer": None},
        state=("optimizer", "rng"),
    )


def _save_full(mgr: CheckpointManager, step: int) -> Path:
    opt_tree, opt_tensors = split_tensors({"m": torch.full((2,), float(step))}, "optimizer")
    tensors = {"model": {"w": torch.full((2,), float(step))}, "disc": {"d": torch.zeros(3)}, "optimizer": opt_tensors}
    return mgr.save(step, tensors, {"optimizer": opt_tree, "rng": {}})


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("rm disc", "disc.safetensors is missing (its folder is incomplete)"),  # a half-deleted folder
        ("truncate model", "model.safetensors is damaged (20 bytes"),
        ("rm optimizer", "optimizer.safetensors is missing"),
        ("state without rng", "state.json is damaged (no rng)"),
        ("foreign model", "model.safetensors does not fit this model (1 keys missing, e.g. w)"),
        ("wrong shape", "model.safetensors does not fit this model (w has shape [5], the model [2])"),
    ],
)
def test_a_damaged_step_folder_is_named_with_why_and_the_one_before_is_used(tmp_path, caplog, damage, why):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save_full(mgr, 1)
    newest = _save_full(mgr, 2)
    action, name = damage.split(" ", 1)
    if action == "rm":
        (newest / f"{name}.safetensors").unlink()
    elif action == "truncate":
        path = newest / f"{name}.safetensors"
        path.write_bytes(path.read_bytes()[:20])
    elif damage == "state without rng":
        state = json.loads((newest / "state.json").read_text())
        del state["rng"]
        (newest / "state.json").write_text(json.dumps(state))
    else:  # written by another model: a complete file whose keys or shapes are not this model's
        tensors = {"v": torch.zeros(2)} if damage == "foreign model" else {"w": torch.zeros(5)}
        save_tensors(newest / "model.safetensors", tensors)
        state = json.loads((newest / "state.json").read_text())
        state.pop(ckpt.FILES_KEY)  # as an older version wrote it: the size check cannot tell
        (newest / "state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING):
        loaded = mgr.load(layout=_layout())
    assert loaded.step == 1 and torch.equal(loaded.tensors["model"]["w"], torch.ones(2))
    assert ckpt.FILES_KEY not in loaded.state
    assert str(newest) in caplog.text and why in caplog.text and "resuming from step-00000001 instead" in caplog.text


def test_stubs_that_name_no_saved_tensor_make_the_folder_damaged(tmp_path):
    mgr = CheckpointManager(tmp_path)
    newest = _save_full(mgr, 1)
    save_tensors(newest / "optimizer.safetensors", {"other": torch.zeros(2)})
    state = json.loads((newest / "state.json").read_text())
    state.pop(ckpt.FILES_KEY)
    (newest / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"no usable checkpoint .*optimizer.safetensors is damaged \(lacks 1 keys"):
        mgr.load(layout=_layout())


def test_resaving_a_step_swaps_whole_folders_and_prunes_a_newer_timeline(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        _save_full(mgr, step)
    # Resumed from step 1 (say step 2 was damaged): saving step 2 again swaps the folder whole; a crash between
    # the two renames leaves the old folder aside (a temp entry) and step 1 as the fallback, never half a folder.
    real_replace = os.replace

    def crash_on_new_folder(src, dst):
        if Path(dst) == tmp_path / "step-00000002":
            raise KeyboardInterrupt  # a kill between "old folder aside" and "new folder in"
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_new_folder)
    with pytest.raises(KeyboardInterrupt):
        _save_full(mgr, 2)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert not (tmp_path / "step-00000002").exists()
    assert mgr.load(layout=_layout()).step == 3  # the pointer still names step 3, which is whole
    saved = _save_full(mgr, 2)
    assert torch.equal(mgr.load(layout=_layout()).tensors["model"]["w"], torch.full((2,), 2.0))
    # step 3 belonged to the abandoned timeline: this run rewrites it, so it is pruned with the oldest
    assert [p.name for p in mgr.step_dirs()] == ["step-00000002", "step-00000001"] and saved.is_dir()
    mgr.remove_leftovers()  # the run lock holder's clean-up takes the folder set aside by the crash
    assert not list(tmp_path.glob(".*.tmp"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_save_removes_temp_folders_of_dead_writers_never_of_live_ones(tmp_path):
    mgr = CheckpointManager(tmp_path)
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())  # as temporary names carry it
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_dir = tmp_path / f".step-00000002.{_dead_pid()}@{host}.abcd1234.tmp"
        live_dir = tmp_path / f".step-00000002.{live.pid}@{host}.abcd1234.tmp"
        untagged = tmp_path / ".step-00000001.abcd1234.tmp"  # an older version's: its writer is unknown
        for folder in (dead_dir, live_dir, untagged):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"x" * 1000)
        _save_full(mgr, 3)
        assert not dead_dir.exists() and live_dir.is_dir() and untagged.is_dir()
    finally:
        live.kill()
        live.wait()
    assert {p.name for p in mgr.remove_leftovers()} == {live_dir.name, untagged.name}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-00000003"]


def test_a_full_disk_during_a_save_is_a_one_line_user_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    _save_full(mgr, 1)
    monkeypatch.setenv(ckpt.FAULT_ENV, "enospc@write:2")
    with pytest.raises(UserError) as err:
        _save_full(mgr, 2)
    message = str(err.value)
    assert message.startswith(f"could not write checkpoint {tmp_path / 'step-00000002'} (No space left on device)")
    assert "rerun with --resume" in message and "\n" not in message
    assert mgr.load(layout=_layout()).step == 1 and sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.json",
        "step-00000001",
    ]
    monkeypatch.delenv(ckpt.FAULT_ENV)
    assert _save_full(mgr, 2).is_dir() and mgr.load().step == 2


# ----- issue 17: one run per folder ----------------------------------------------------------------------------

HOLD_LOCK = "import sys, time; from unicode_mllm.runtime.run_lock import RunLock; RunLock(sys.argv[1]).__enter__(); "


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that takes the run lock on `folder` and keeps it until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK + "print('locked', flush=True); time.sleep(120)", str(folder)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_of_a_run_folder_is_refused_naming_it_and_the_holder(
    mllm_cfg, tiny_lm_dir, tiny_shapes_dir, tmp_path, capsys
):
    from tests.test_tokenizer_training import tiny_cfg
    from unicode_mllm.cli import main
    from unicode_mllm.stages.lm import LMTrainConfig, train_lm
    from unicode_mllm.stages.mllm import train_mllm
    from unicode_mllm.stages.tokenizer.trainer import train_tokenizer

    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        refusal = rf"{out} is in use by another run \(pid {holder.pid} on .*\); wait for it to end"
        with pytest.raises(UserError, match=refusal):
            train_lm(load_config(LMTrainConfig, overrides=TINY), out)
        with pytest.raises(UserError, match=refusal):
            train_tokenizer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, out), resume=True)
        with pytest.raises(UserError, match=refusal):
            train_mllm(mllm_cfg(out))
        code = main(["train-lm", "--config", "configs/lm/tiny.yaml", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {out} is in use by another run (pid {holder.pid}")
        assert err.count("\n") == 1
        assert json.loads((out / ".lock").read_text())["pid"] == holder.pid
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, no stale file blocks the next run
        holder.wait()
    with RunLock(out), RunLock(out):  # free again, and re-entrant within a process (train_* then fit)
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert not (out / ".lock").exists()


def test_the_lock_is_the_main_process_only_and_a_refused_run_leaves_no_empty_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not RunLock(tmp_path / "a").enabled and RunLock(tmp_path / "a", enabled=True).enabled
    monkeypatch.setenv("RANK", "0")
    with RunLock(tmp_path / "new" / "run"):
        assert (tmp_path / "new" / "run" / ".lock").is_file()
    assert not (tmp_path / "new" / "run").exists()  # created for the lock only, and left empty


# ----- issue 17: a resume keeps the run's settings ---------------------------------------------------------------


def _fake_resumable_run(out_dir: Path, cfg, config_name: str = "config.yaml") -> None:
    """The files the checks before loading look at: one checkpoint and the run's saved config."""
    CheckpointManager(out_dir / "checkpoints").save(3, {"model": {"w": torch.zeros(2)}}, {})
    (out_dir / config_name).write_text(dump_config(cfg))


def test_every_stage_refuses_a_resume_with_changed_settings_unless_allowed(
    mllm_cfg, tiny_lm_dir, tiny_shapes_dir, tmp_path
):
    from tests.test_tokenizer_training import tiny_cfg
    from unicode_mllm.stages.lm import LMTrainConfig, train_lm
    from unicode_mllm.stages.mllm import train_mllm
    from unicode_mllm.stages.tokenizer.trainer import train_tokenizer

    tk = tmp_path / "tk"
    _fake_resumable_run(tk, tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tk))
    changed = tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tk, **{"optim.lr": 0.5, "data.batch_size": 8})
    expected = (
        rf"cannot resume {tk} with other settings than its config.yaml: data.batch_size 4 -> 8, optim.lr .* -> 0.5;"
    )
    with pytest.raises(UserError, match=expected + " resume with the run's settings, pass --allow-changed KEY"):
        train_tokenizer(changed, resume=True)
    with pytest.raises(UserError, match=r"other settings than its config.yaml: data.batch_size 4 -> 8;"):
        train_tokenizer(changed, resume=True, allow_changed=["optim"])  # a whole section may be allowed
    with pytest.raises(UserError, match=r"--allow-changed optim.lrr: this config has no such key"):
        train_tokenizer(changed, resume=True, allow_changed=["optim.lrr", "data.batch_size"])
    # Settings that never change what a step computes may change: the check passes and the (fake) checkpoint
    # is what fails to load.
    safe = {"train.steps": 9, "train.max_minutes": 5, "train.log_every": 2, "train.keep_checkpoints": 3}
    with pytest.raises(UserError, match="no usable checkpoint"):
        train_tokenizer(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tk, **safe), resume=True)
    with pytest.raises(UserError, match="no usable checkpoint"):
        train_tokenizer(changed, resume=True, allow_changed=["optim.lr", "data.batch_size"])

    mm = tmp_path / "mm"
    _fake_resumable_run(mm, mllm_cfg(mm))
    with pytest.raises(UserError, match=r"its config.yaml: optim.lr 0.001 -> 0.002; resume with the run's settings"):
        train_mllm(mllm_cfg(mm, optim={"lr": 2e-3}), resume=True)

    lm = tmp_path / "lm"
    lm_cfg = load_config(LMTrainConfig, overrides=[*TINY, f"train.out_dir={lm}"])
    _fake_resumable_run(lm, lm_cfg, "lm_config.yaml")
    with pytest.raises(UserError, match=r"its lm_config.yaml: train.batch_size 2 -> 4; resume with"):
        train_lm(load_config(LMTrainConfig, overrides=[*TINY, "train.batch_size=4"]), lm, resume=True)


def test_the_train_commands_take_allow_changed(tiny_lm_dir, tiny_shapes_dir, tmp_path, capsys):
    from tests.test_tokenizer_training import tiny_cfg
    from unicode_mllm.cli import main

    out = tmp_path / "tk"
    _fake_resumable_run(out, tiny_cfg(tiny_lm_dir, tiny_shapes_dir, out))
    config = tmp_path / "tk.yaml"
    config.write_text(dump_config(tiny_cfg(tiny_lm_dir, tiny_shapes_dir, out)))
    command = ["train-tokenizer", "--config", str(config), "--out", str(out), "--resume", "--set", "optim.lr=0.5"]
    assert main(command) == 2 and "optim.lr 0.0002 -> 0.5" in capsys.readouterr().err
    assert main([*command, "--allow-changed", "optim.lr"]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err  # past the settings check
    for name in ("train-lm", "train-tokenizer", "train-mllm"):
        assert main([name, "--help"]) == 0 and "--allow-changed" in capsys.readouterr().out


# ----- issue 17: every stage resumes through one checked loading path; the end of a run saves no step twice ---------


@pytest.fixture(scope="module")
def epoch_shapes_dir(tmp_path_factory):
    """8 training records (two shards): an epoch is 2 stage-1 batches of 4, or 4 stage-2 batches of 2 records."""
    from unicode_mllm.data.shapes import ShapesConfig
    from unicode_mllm.data.shapes_dataset import write_shapes_dataset

    path = tmp_path_factory.mktemp("shapes_epochs")
    write_shapes_dataset(ShapesConfig(image_size=32), path, {"train": 8, "val": 4, "heldout": 4}, shard_size=4)
    return path


# Stage 0 with a corpus of 79 windows: 4 batches of 16 an epoch (the 15 left over are skipped).
LM_EPOCHS = [*TINY, "corpus.train_samples=12", "train.batch_size=16", "train.ckpt_every=1"]


def run_stage(stage: str, out: Path, steps: int, resume: bool, dirs: dict[str, Path], **extra):
    """Train `stage` (lm, tokenizer, mllm) to `steps` into `out` with a checkpoint every step (in process)."""
    from tests.test_tokenizer_training import tiny_cfg
    from unicode_mllm.stages.lm import LMTrainConfig, train_lm
    from unicode_mllm.stages.mllm import train_mllm
    from unicode_mllm.stages.tokenizer.trainer import train_tokenizer

    if stage == "lm":
        overrides = [*LM_EPOCHS, f"train.steps={steps}", *(f"{k}={v}" for k, v in extra.items())]
        return train_lm(load_config(LMTrainConfig, overrides=overrides), out, resume=resume)
    if stage == "tokenizer":
        settings = {"train.steps": steps, "train.ckpt_every": 1, "codebook.blend.ramp_steps": 2, **extra}
        return train_tokenizer(tiny_cfg(dirs["lm"], dirs["shapes"], out, **settings), resume=resume).final_dir
    cfg = make_config(dirs["lm"], dirs["vt"], dirs["shapes"], out, train={"steps": steps, "ckpt_every": 1, **extra})
    return train_mllm(cfg, resume=resume).final_dir


@pytest.fixture
def stage_dirs(tiny_lm_dir, tiny_visual_tokenizer_dir, epoch_shapes_dir):
    return {"lm": tiny_lm_dir, "vt": tiny_visual_tokenizer_dir, "shapes": epoch_shapes_dir}


def _data_position(state: dict) -> tuple[int, int]:
    data = state["data"]
    if "sources" in data:  # stage 2
        data = next(iter(data["sources"].values()))
    return data["epoch"], data.get("batch", data.get("index"))


@pytest.mark.parametrize(("stage", "group"), [("lm", "model"), ("tokenizer", "discriminator"), ("mllm", "trainable")])
def test_every_stage_falls_back_past_a_half_deleted_step_folder(
    stage, group, stage_dirs, tmp_path, caplog, monkeypatch
):
    saves = []
    save = CheckpointManager.save
    monkeypatch.setattr(CheckpointManager, "save", lambda self, step, *a: saves.append(step) or save(self, step, *a))
    out = tmp_path / stage
    run_stage(stage, out, 2, False, stage_dirs)
    assert saves == [1, 2]  # the end of the run does not write step 2 again (stages 1 and 2 did)
    # What a kill in the middle of deleting the step folder left (the old re-save deleted it first), and what
    # killed writers left: the temp folders of a save and of a final-model swap.
    (out / "checkpoints" / "step-00000002" / f"{group}.safetensors").unlink()
    leftovers = [out / "checkpoints" / ".step-00000003.4242@elsewhere.abcd1234.tmp", out / ".final.tmp"]
    for leftover in leftovers:
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"x" * 100)
    with caplog.at_level(logging.INFO):
        run_stage(stage, out, 2, True, stage_dirs)
    missing = out / "checkpoints" / "step-00000002" / f"{group}.safetensors"
    assert (
        f"checkpoint file {missing} is missing (its folder is incomplete); resuming from step-00000001" in caplog.text
    )
    assert saves == [1, 2, 2] and not any(p.exists() for p in leftovers)  # step 2 again: its damaged folder swapped
    assert CheckpointManager(out / "checkpoints").load().step == 2


@pytest.mark.parametrize(("stage", "epoch_steps"), [("lm", 4), ("tokenizer", 2), ("mllm", 4)])
def test_every_stage_resumes_from_the_last_batch_of_an_epoch(stage, epoch_steps, stage_dirs, tmp_path):
    """Stage 2 could not ("an epoch of the stage-2 data gave no sample"): a fully replayed epoch looked empty."""
    out = tmp_path / stage
    run_stage(stage, out, epoch_steps, False, stage_dirs)
    manager = CheckpointManager(out / "checkpoints")
    assert _data_position(manager.load().state)[0] == 0
    run_stage(stage, out, epoch_steps + 1, True, stage_dirs)
    epoch, taken = _data_position(manager.load().state)
    assert (epoch, taken) == (1, 16 if stage == "lm" else 1)  # the first batch of the next epoch


@pytest.mark.slow
def test_stage2_resumes_from_the_last_batch_of_an_epoch_as_reported(tiny_lm_dir, tiny_visual_tokenizer_dir, tmp_path):
    """The report's case: 100 records, 2 a batch (50 batches an epoch), trained to step 50, resumed to 60."""
    from unicode_mllm.data.shapes import ShapesConfig
    from unicode_mllm.data.shapes_dataset import write_shapes_dataset

    shapes = tmp_path / "shapes"
    write_shapes_dataset(ShapesConfig(image_size=32), shapes, {"train": 100, "heldout": 4}, shard_size=50)
    dirs = {"lm": tiny_lm_dir, "vt": tiny_visual_tokenizer_dir, "shapes": shapes}
    run_stage("mllm", tmp_path / "mm", 50, False, dirs, ckpt_every=50)
    run_stage("mllm", tmp_path / "mm", 60, True, dirs, ckpt_every=50)
    assert _data_position(CheckpointManager(tmp_path / "mm" / "checkpoints").load().state) == (1, 10)


def _collective_save_rank(rank: int, init_file: str, root: str, failing_rank: int) -> None:
    import errno

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        manager = CheckpointManager(Path(root))
        local = {"moment": torch.full((3,), float(rank))}
        manager.save_collective(1, {"weights": {"w": torch.ones(2)}}, {"note": "first"}, "optimizer", local)
        if rank == failing_rank:  # this rank's disk is full at step 2

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            ckpt.save_tensors = full
        try:
            manager.save_collective(2, {"weights": {"w": torch.zeros(2)}}, {"note": "second"}, "optimizer", local)
            outcome = "saved"
        except UserError as e:
            outcome = str(e)
        mine = ckpt.load_shard(manager.latest(), "optimizer", rank)["moment"].tolist()
        (Path(root) / f"rank{rank}.json").write_text(json.dumps({"outcome": outcome, "mine": mine}))
    finally:
        dist.destroy_process_group()


def test_a_collective_save_is_whole_or_absent_and_each_rank_reads_its_own_file(tmp_path):
    """`save_collective` (DeepSpeed's per-rank optimizer partitions): every rank's file lands in one atomic step
    folder; a write error on one rank is the same one-line UserError on every rank and leaves the previous
    checkpoint the latest, with no temporary folder behind."""
    import torch.multiprocessing as mp

    root = tmp_path / "checkpoints"
    mp.spawn(_collective_save_rank, args=(str(tmp_path / "init"), str(root), 1), nprocs=2, join=True)
    results = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["outcome"] == results[1]["outcome"]
    assert results[0]["outcome"].startswith("could not write checkpoint") and "\n" not in results[0]["outcome"]
    assert [r["mine"] for r in results] == [[0.0] * 3, [1.0] * 3]
    manager = CheckpointManager(root)
    assert [p.name for p in manager.step_dirs()] == ["step-00000001"] and not list(root.glob(".*.tmp"))
    loaded = manager.load()
    assert loaded.state["note"] == "first" and set(loaded.tensors) == {"weights"}  # rank files: by their rank only
    assert sorted(p.name for p in loaded.path.glob("*.safetensors")) == [
        "optimizer.rank00000.safetensors",
        "optimizer.rank00001.safetensors",
        "weights.safetensors",
    ]
    layout = CheckpointLayout(tensors={"weights": None, "optimizer": None})  # what a DDP resume expects
    with pytest.raises(UserError, match=r"holds optimizer as DeepSpeed ZeRO partitions, .*DeepSpeed launch"):
        manager.check_dir(loaded.path, layout)
