from __future__ import annotations

import json
import stat

import pytest
import torch
from safetensors.torch import load_file

from unicode_mllm.errors import UserError
from unicode_mllm.runtime import checkpoint as ckpt
from unicode_mllm.runtime.checkpoint import (
    CheckpointManager,
    atomic_write_text,
    join_tensors,
    save_tensors,
    split_tensors,
)


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
