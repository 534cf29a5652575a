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
import logging
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

log = logging.getLogger(__name__)

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
        raise UserError(f"checkpoint file {path} is damaged ({e})") from None


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

    def step_dirs(self) -> list[Path]:
        """Every `step-N` folder, newest first (temporary `.step-*` folders never match)."""
        return sorted((p for p in self.root.glob("step-*") if p.is_dir()), reverse=True)

    def exists(self) -> bool:
        """Whether a fresh run would overwrite checkpoints here (a pointer or any step folder, damaged or not)."""
        return self.pointer.is_file() or bool(self.step_dirs())

    def _pointed(self) -> tuple[Path | None, str]:
        """The folder latest.json names, or None and what is wrong with the pointer ("" when there is none)."""
        if not self.pointer.is_file():
            return None, f"{self.pointer} is missing" if self.step_dirs() else ""
        try:
            name = json.loads(self.pointer.read_text())["name"]
            path = self.root / name
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            return None, f"{self.pointer} is damaged"
        return (path, "") if path.is_dir() else (None, f"{self.pointer} names {name}, which is missing")

    def candidates(self) -> list[Path]:
        """Checkpoint folders to resume from, best first: the one latest.json names, then the others newest first.

        A missing or damaged pointer is not fatal while complete step-* folders remain (their rename is atomic):
        it is logged, naming the folder used instead.
        """
        pointed, problem = self._pointed()
        rest = [p for p in self.step_dirs() if p != pointed]
        if pointed is not None:
            return [pointed, *rest]
        if problem and not rest:
            raise UserError(f"{problem} and no step-* folder is left in {self.root}; delete {self.root} to start over")
        if problem:
            log.warning("%s; using the newest step-* folder, %s", problem, rest[0].name)
        return rest

    def no_checkpoint_error(self) -> UserError:
        return UserError(f"--resume: no checkpoint in {self.root}; check --out, or leave out --resume to start afresh")

    def latest(self) -> Path | None:
        """The folder to resume from (see `candidates`), or None when there is no checkpoint yet."""
        candidates = self.candidates()
        return candidates[0] if candidates else None

    def load(self, path: str | Path | None = None, device: str | torch.device = "cpu") -> Checkpoint:
        """Load a checkpoint folder; by default the latest, falling back to an older one (with a warning) when
        the latest is damaged, so a crash that spoiled one checkpoint costs only the steps since the one before."""
        if path is not None:
            return self._load_dir(Path(path), device)
        candidates = self.candidates()
        if not candidates:
            raise self.no_checkpoint_error()
        errors = []
        for candidate in candidates:
            try:
                checkpoint = self._load_dir(candidate, device)
            except UserError as e:
                errors.append(str(e))
                continue
            for error in errors:
                log.warning("%s; resuming from %s instead", error, candidate.name)
            return checkpoint
        raise UserError(
            f"no usable checkpoint in {self.root} ({errors[0]}); restore the file, or train into another --out "
            "to start over"
        )

    def _load_dir(self, path: Path, device: str | torch.device) -> Checkpoint:
        state_file = path / "state.json"
        if not state_file.is_file():
            raise UserError(f"checkpoint {path} has no state.json; it is not a checkpoint folder")
        state = _read_state(state_file)
        tensors = {p.stem: load_tensors(p, device) for p in sorted(path.glob("*.safetensors"))}
        return Checkpoint(path=path, step=int(state["step"]), tensors=tensors, state=state)


def _read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json; a truncated or foreign file is a one-line UserError naming it."""
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint file {path} is damaged (not valid JSON: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"checkpoint file {path} is damaged (no integer 'step')")
    return state


def refuse_to_overwrite(out_dir: str | Path, checkpoints: CheckpointManager, final_dir: str | Path) -> None:
    """Raise UserError when a fresh (not resumed) run into `out_dir` would overwrite another run's
    checkpoints or final model: every stage refuses the same way, before any work is done."""
    fix = "train into another --out (or delete it) to start over"
    if checkpoints.exists():
        newest = checkpoints.step_dirs()
        which = f" (newest {newest[0].name})" if newest else ""
        raise UserError(f"{out_dir} already holds checkpoints{which}; pass --resume to continue that run, or {fix}")
    if Path(final_dir).exists():
        raise UserError(f"{out_dir} already holds a finished model in {Path(final_dir).name}/; {fix}")
