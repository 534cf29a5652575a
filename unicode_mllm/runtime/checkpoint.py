"""Atomic checkpoints: tensors in safetensors, everything else in JSON, never a half-written file.

Layout of a run directory:

    run/checkpoints/step-00000100/{model.safetensors, optimizer.safetensors, state.json}
    run/checkpoints/latest.json          -> {"name": "step-00000100", "step": 100}

A checkpoint is first written to a temporary sibling directory, every file fsynced, then the
directory is renamed into place and `latest.json` is replaced atomically. A crash at any point
leaves the previous checkpoint and pointer intact. Single files use the same write-fsync-rename.

Nested state (optimizer, scheduler, RNG, data position) is flattened by `split_tensors`: tensors
go to safetensors under dotted keys, the rest becomes JSON with `{"__tensor__": key}` stubs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unicode_mllm.errors import UserError

TENSOR_STUB = "__tensor__"


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp / mkdtemp create 0600 / 0700 entries; what we rename into place should get the modes that a plain
# open() / mkdir() would give (0666 / 0777 less the umask), so shared runs and data stay readable to the group.
_UMASK = _process_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform lets you open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync the result and rename it over `path`.

    If `write` raises, the temporary file is removed and any existing `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _unshare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (e.g. one shared codebook under every layer's
    key): store each key as its own contiguous copy."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a safetensors file."""
    clean = _unshare(tensors)
    return atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=metadata))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or damaged file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file {path} not found")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint file {path} is damaged ({e}); resume from an earlier checkpoint") from None


def split_tensors(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested dict/list by a stub; return (json_tree, {key: tensor})."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[key] = node
            return {TENSOR_STUB: key}
        if isinstance(node, Mapping):
            # JSON keys must be strings; remember int keys (optimizer state is keyed by param index).
            return {"__dict__": [[k, walk(v, f"{key}.{k}" if key else str(k))] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            items = [walk(v, f"{key}.{i}" if key else str(i)) for i, v in enumerate(node)]
            return {"__tuple__": items} if isinstance(node, tuple) else items
        return node

    return walk(tree, prefix), tensors


def join_tensors(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of `split_tensors`."""
    if isinstance(tree, Mapping):
        if TENSOR_STUB in tree:
            return tensors[tree[TENSOR_STUB]]
        if "__dict__" in tree:
            return {k: join_tensors(v, tensors) for k, v in tree["__dict__"]}
        if "__tuple__" in tree:
            return tuple(join_tensors(v, tensors) for v in tree["__tuple__"])
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    return tree


@dataclass
class Checkpoint:
    """What `CheckpointManager.load` returns: tensor groups by file name, and the JSON state."""

    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]


class CheckpointManager:
    """Writes `step-N` checkpoint directories atomically, keeps the last `keep_last`, finds the latest."""

    def __init__(self, root: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    @property
    def pointer(self) -> Path:
        return self.root / "latest.json"

    def save(self, step: int, tensors: Mapping[str, Mapping[str, torch.Tensor]], state: Mapping[str, Any]) -> Path:
        """Write `{group}.safetensors` for each tensor group plus `state.json`; return the directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        final = self.root / name
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.root))
        try:
            os.chmod(tmp, DIR_MODE)
            for group, group_tensors in tensors.items():
                save_tensors(tmp / f"{group}.safetensors", group_tensors)
            atomic_write_json(tmp / "state.json", {"step": step, **state})
            _fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        atomic_write_json(self.pointer, {"name": name, "step": step})
        self._prune(keep=name)
        return final

    def _prune(self, keep: str) -> None:
        # Temporary folders start with "." and never match "step-*".
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in done[: max(0, len(done) - self.keep_last)]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The directory named by `latest.json`, or None when there is no checkpoint yet."""
        if not self.pointer.is_file():
            return None
        try:
            name = json.loads(self.pointer.read_text())["name"]
        except (json.JSONDecodeError, KeyError):
            raise UserError(f"{self.pointer} is damaged; delete it to resume from the newest step-* folder") from None
        path = self.root / name
        if not path.is_dir():
            raise UserError(f"{self.pointer} names {name}, which is missing; delete the pointer or restore it")
        return path

    def load(self, path: str | Path | None = None, device: str | torch.device = "cpu") -> Checkpoint:
        """Load a checkpoint directory (default: the latest)."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise UserError(f"no checkpoint in {self.root}; train first or point --resume at a step-* folder")
        state_file = path / "state.json"
        if not state_file.is_file():
            raise UserError(f"checkpoint {path} has no state.json; it is not a checkpoint folder")
        state = json.loads(state_file.read_text())
        tensors = {p.stem: load_tensors(p, device) for p in sorted(path.glob("*.safetensors"))}
        return Checkpoint(path=path, step=int(state["step"]), tensors=tensors, state=state)
