"""Atomic checkpoints: tensors in safetensors, everything else in JSON, never a half-written file.

Layout of a run directory:

    run/checkpoints/step-00000100/{model.safetensors, optimizer.safetensors, state.json}
    run/checkpoints/latest.json          -> {"name": "step-00000100", "step": 100}

A checkpoint is first written to a temporary sibling directory, every file fsynced, then the
directory is renamed into place and `latest.json` is replaced atomically. A crash at any point
leaves the previous checkpoint and pointer intact. Single files use the same write-fsync-rename.
state.json lists every tensor file with its size and key count, so loading checks a step folder as a
whole and falls back past a damaged one. Temporary folders carry their writer's pid and host, so the
next save removes those of writers that died (a run that holds the run lock removes all of them).

Nested state (optimizer, scheduler, RNG, data position) is flattened by `split_tensors`: tensors
go to safetensors under dotted keys, the rest becomes JSON with `{"__tensor__": key}` stubs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from unicode_mllm.errors import UserError

log = logging.getLogger(__name__)

TENSOR_STUB = "__tensor__"
FILES_KEY = "__files__"  # in state.json: {group: {"bytes": size, "keys": count}} of the folder's tensor files
STEP_DIR = re.compile(r"step-(\d+)")
SHARD_STEM = re.compile(r".+\.rank\d{5}")  # a process's own tensor file in a step folder (`save_collective`)

# Test hook: "ACTION@POINT[:STEP]" (comma-separated) makes a save misbehave at POINT of the step STEP (any step
# without one). ACTION: kill (SIGKILL this process), enospc (raise a disk-full OSError), sleep=SECONDS. POINT:
# write (after the first tensor file), rename (every file written, before the folder is renamed into place),
# pointer (renamed, latest.json not yet updated), saved (the save complete). tests/test_fault_injection.py.
FAULT_ENV = "UNICODE_MLLM_CHECKPOINT_FAULT"
FAULT_POINTS = ("write", "rename", "pointer", "saved")

# Write errors the user can fix (space, quota, permissions): a one-line UserError instead of a traceback.
USER_FIXABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


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


def inject_fault(point: str, step: int, path: Path) -> None:
    """The FAULT_ENV test hook at `point` of the save of `step` (a no-op unless the variable is set)."""
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        action, _, where = spec.partition("@")
        at, _, at_step = where.partition(":")
        if at != point or (at_step and int(at_step) != step):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        elif action.startswith("sleep="):
            time.sleep(float(action.removeprefix("sleep=")))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def writer_tag() -> str:
    """`pid@host` of this process, put into temporary names so that a later writer can tell a dead one's."""
    return f"{os.getpid()}@{_host()}"


def _writer_is_dead(name: str) -> bool:
    """Whether the temporary entry `name` was made by a process of this host that no longer runs."""
    match = re.search(r"\.(\d+)@([A-Za-z0-9-]+)\.", name)
    if match is None or match[2] != _host():
        return False  # another host's writer (or an untagged entry) may still be alive: only the run lock knows
    pid = int(match[1])
    if pid == os.getpid():
        return True  # ours, left by a save that failed: this process writes one checkpoint at a time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_temp_entries(folder: Path, only_dead_writers: bool) -> list[Path]:
    """Delete the `.*.tmp` files and folders in `folder` that interrupted writes left; return them.

    `only_dead_writers`: only entries whose tagged writer is known dead; otherwise all of them, which only a
    caller that holds the folder's run lock (so no other writer is alive) may ask for.
    """
    removed = []
    for entry in sorted(folder.glob(".*.tmp")) if folder.is_dir() else []:
        if only_dead_writers and not _writer_is_dead(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.info("removed %d leftover temporary entries of interrupted writes in %s", len(removed), folder)
    return removed


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` to `final`. An existing `final` is renamed aside first and deleted after,
    so a crash at any moment leaves one of the two whole, never a half-deleted folder."""
    trash = None
    if final.exists():
        trash = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old.tmp")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def write_errors_as_user_errors(what: str, fix: str):
    """OSErrors the user can fix (disk full, quota, read-only, permissions) while writing `what` become a
    one-line UserError ending with `fix`; others stay what they are."""
    try:
        yield
    except OSError as e:
        if e.errno not in USER_FIXABLE_ERRNOS:
            raise
        raise UserError(f"could not write {what} ({e.strerror or e}); {fix}") from e


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


@dataclass(frozen=True)
class CheckpointLayout:
    """What a trainer needs from a step folder, checked before anything of it is used.

    tensors: group -> {key: shape} that its file must hold exactly (a model's state dict), or None when any
    keys do (the optimizer's, whose stubs in the state are checked instead). optional: groups an older format
    may lack. state: top-level state.json keys. A state entry named like a group may hold tensor stubs
    (`split_tensors`): each must name a key of that group.
    """

    tensors: Mapping[str, Mapping[str, tuple[int, ...]] | None]
    state: Collection[str] = ()
    optional: Collection[str] = field(default_factory=tuple)


def tensor_shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """{key: shape}: a `CheckpointLayout` group for a state dict."""
    return {key: tuple(t.shape) for key, t in tensors.items()}


def _stubs(tree: Any) -> list[str]:
    if isinstance(tree, Mapping):
        if TENSOR_STUB in tree:
            return [tree[TENSOR_STUB]]
        return [key for value in tree.values() for key in _stubs(value)]
    if isinstance(tree, list):
        return [key for value in tree for key in _stubs(value)]
    return []


def _step_of(path: Path) -> int | None:
    match = STEP_DIR.fullmatch(path.name)
    return int(match[1]) if match else None


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
        """Write `{group}.safetensors` for each tensor group plus `state.json`; return the directory.

        A disk-full or permission error is a one-line UserError: the previous checkpoint stays the latest.
        """
        with write_errors_as_user_errors(f"checkpoint {self.root / _step_name(step)}", self._fix):
            tmp = self._new_temp(step)
            self._commit(step, tmp, tensors, state, {})
        return self._finish(step)

    def save_collective(
        self,
        step: int,
        tensors: Mapping[str, Mapping[str, torch.Tensor]],
        state: Mapping[str, Any],
        group: str,
        local: Mapping[str, torch.Tensor],
    ) -> Path:
        """`save` with each process's own `local` tensors as `{group}.rank{R}.safetensors` in the same folder
        (a sharded optimizer state): every rank calls it, `tensors` and `state` count on the main rank only.

        The main rank makes the temporary folder, every rank writes its file into it, and the main rank renames
        the folder into place once all have (state.json lists every file), so the folder appears whole or not at
        all. A write error on any rank is a one-line UserError on every rank. Needs torch.distributed.
        """
        import torch.distributed as dist

        rank, main = dist.get_rank(), dist.get_rank() == 0
        final = self.root / _step_name(step)
        what = f"checkpoint {final}"
        box: list[Any] = [None]
        if main:
            box[0] = _attempt(lambda: str(self._new_temp(step)), what, self._fix)
        dist.broadcast_object_list(box, src=0)
        made = box[0]
        if made[0] == "error":
            raise UserError(made[1])
        tmp = Path(made[1])

        def write_shard() -> dict[str, int]:
            saved = save_tensors(tmp / f"{shard_stem(group, rank)}.safetensors", local)
            return {"bytes": saved.stat().st_size, "keys": len(local)}

        written: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(written, _attempt(write_shard, what, self._fix))
        files = {shard_stem(group, r): result[1] for r, result in enumerate(written) if result[0] == "ok"}
        errors = [result[1] for result in written if result[0] == "error"]
        if main:
            box[0] = (
                ("error", errors[0])
                if errors
                else _attempt(lambda: self._commit(step, tmp, tensors, state, files), what, self._fix)
            )
            if box[0][0] == "error":
                shutil.rmtree(tmp, ignore_errors=True)
        dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            raise UserError(box[0][1])
        if main:
            self._finish(step)
        dist.barrier()  # no rank goes on (or dies) before the folder is in place
        return final

    @property
    def _fix(self) -> str:
        return f"free space in {self.root} (or fix its permissions) and rerun with --resume"

    def _new_temp(self, step: int) -> Path:
        """An empty temporary sibling folder for the checkpoint of `step`, tagged with this writer."""
        self.root.mkdir(parents=True, exist_ok=True)
        remove_temp_entries(self.root, only_dead_writers=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{_step_name(step)}.{writer_tag()}.", suffix=".tmp", dir=self.root))
        os.chmod(tmp, DIR_MODE)
        return tmp

    def _commit(
        self,
        step: int,
        tmp: Path,
        tensors: Mapping[str, Mapping[str, torch.Tensor]],
        state: Mapping[str, Any],
        files: Mapping[str, Mapping[str, int]],
    ) -> None:
        """Write the tensor groups and state.json (listing them and the `files` already in `tmp`) into `tmp`, then
        rename it into place and point latest.json at it; `tmp` is removed if any of it fails."""
        name = _step_name(step)
        final = self.root / name
        try:
            files = dict(files)
            for group, group_tensors in tensors.items():
                saved = save_tensors(tmp / f"{group}.safetensors", group_tensors)
                files[group] = {"bytes": saved.stat().st_size, "keys": len(group_tensors)}
                inject_fault("write", step, saved)
            atomic_write_json(tmp / "state.json", {"step": step, **state, FILES_KEY: files})
            _fsync_dir(tmp)
            inject_fault("rename", step, tmp)
            replace_dir(tmp, final)  # re-saving a step (after resuming from an older one) swaps whole folders
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        inject_fault("pointer", step, final)
        atomic_write_json(self.pointer, {"name": name, "step": step})

    def _finish(self, step: int) -> Path:
        final = self.root / _step_name(step)
        self._prune(step)
        inject_fault("saved", step, final)
        return final

    def _prune(self, saved_step: int) -> None:
        """Keep the newest `keep_last` folders up to `saved_step`. Newer ones belong to a run that was resumed
        from an older checkpoint (or are damaged): this run rewrites those steps, so they go too."""
        done = self.step_dirs()
        newer = [p for p in done if _step_of(p) > saved_step]  # type: ignore[operator]
        older = [p for p in done if p not in newer]
        for old in newer + older[self.keep_last :]:
            shutil.rmtree(old, ignore_errors=True)

    def remove_leftovers(self) -> list[Path]:
        """Delete every temporary entry of interrupted saves. Only for the holder of the run lock (no other
        writer alive); `save` itself removes those of dead writers only."""
        return remove_temp_entries(self.root, only_dead_writers=False)

    def step_dirs(self) -> list[Path]:
        """Every `step-N` folder, newest first (temporary `.step-*` folders never match)."""
        found = [p for p in self.root.glob("step-*") if p.is_dir() and _step_of(p) is not None]
        return sorted(found, key=_step_of, reverse=True)  # type: ignore[arg-type]

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

    def load(
        self, path: str | Path | None = None, device: str | torch.device = "cpu", layout: CheckpointLayout | None = None
    ) -> Checkpoint:
        """Load a checkpoint folder, checked whole (`check_dir`); by default the latest, falling back to an older
        one (with a warning naming the damaged folder and why) when the latest is damaged, so a crash that spoiled
        one checkpoint costs only the steps since the one before. Every stage resumes through here."""
        if path is not None:
            return self._load_dir(Path(path), device, layout)
        candidates = self.candidates()
        if not candidates:
            raise self.no_checkpoint_error()
        errors = []
        for candidate in candidates:
            try:
                checkpoint = self._load_dir(candidate, device, layout)
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

    def check_dir(self, path: Path, layout: CheckpointLayout | None = None) -> dict[str, Any]:
        """The folder's state, after checking it whole without reading any tensor data: state.json, every
        tensor file it lists (present, of the size written), and `layout`'s groups, keys, shapes and state keys.
        Raises a one-line UserError naming the folder or file and what is wrong."""
        state_file = path / "state.json"
        if not state_file.is_file():
            raise UserError(f"checkpoint {path} has no state.json; it is not a checkpoint folder")
        state = _read_state(state_file)
        files = state.get(FILES_KEY, {})  # absent in checkpoints of older versions: their files are not listed
        for group, written in files.items():
            file = path / f"{group}.safetensors"
            if not file.is_file():
                raise UserError(f"checkpoint file {file} is missing (its folder is incomplete)")
            size = file.stat().st_size
            if size != written["bytes"]:
                raise UserError(f"checkpoint file {file} is damaged ({size} bytes, {written['bytes']} were written)")
        if layout is None:
            return state
        for group, expected in layout.tensors.items():
            file = path / f"{group}.safetensors"
            if not file.is_file():
                if group in layout.optional:
                    continue
                if (path / f"{shard_stem(group, 0)}.safetensors").is_file():
                    raise UserError(
                        f"checkpoint {path} holds {group} as DeepSpeed ZeRO partitions, one file a process; resume "
                        "it under the DeepSpeed launch that wrote it"
                    )
                raise UserError(f"checkpoint file {file} is missing (its folder is incomplete)")
            shapes = _header_shapes(file)
            if expected is not None and shapes != dict(expected):
                raise UserError(
                    f"checkpoint file {file} does not fit this model ({_shape_difference(shapes, expected)})"
                )
            if group in state:
                missing = sorted(set(_stubs(state[group])) - set(shapes))
                if missing:
                    raise UserError(f"checkpoint file {file} is damaged (lacks {len(missing)} keys, e.g. {missing[0]})")
        absent = [key for key in layout.state if key not in state]
        if absent:
            raise UserError(f"checkpoint file {state_file} is damaged (no {', '.join(absent)})")
        return state

    def _load_dir(self, path: Path, device: str | torch.device, layout: CheckpointLayout | None = None) -> Checkpoint:
        state = self.check_dir(path, layout)
        # Per-rank files (`save_collective`) are each read by their own rank (`load_shard`), not by every rank.
        files = sorted(p for p in path.glob("*.safetensors") if not SHARD_STEM.fullmatch(p.stem))
        tensors = {p.stem: load_tensors(p, device) for p in files}
        state.pop(FILES_KEY, None)
        return Checkpoint(path=path, step=int(state["step"]), tensors=tensors, state=state)


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def shard_stem(group: str, rank: int) -> str:
    """The file name (without .safetensors) of process `rank`'s tensors of `group` in a step folder."""
    return f"{group}.rank{rank:05d}"


def load_shard(path: Path, group: str, rank: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Process `rank`'s tensors of `group` in the step folder `path` (written by `save_collective`)."""
    file = path / f"{shard_stem(group, rank)}.safetensors"
    if not file.is_file():
        raise UserError(f"checkpoint {path} has no {file.name}; resume with the launch that wrote it (its processes)")
    return load_tensors(file, device)


def _attempt(action: Callable[[], Any], what: str, fix: str) -> tuple[str, Any]:
    """("ok", action()) or ("error", the one-line message of a write error the user can fix), for sending to the
    other ranks; other errors propagate."""
    try:
        with write_errors_as_user_errors(what, fix):
            return "ok", action()
    except UserError as e:
        return "error", str(e)


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} from a safetensors header (no tensor data is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint file {path} is damaged ({e})") from None


def _shape_difference(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> str:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        return f"{len(missing)} keys missing, e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} unexpected keys, e.g. {extra[0]}"
    key = next(k for k in sorted(expected) if tuple(found[k]) != tuple(expected[k]))
    return f"{key} has shape {list(found[key])}, the model {list(expected[key])}"


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
