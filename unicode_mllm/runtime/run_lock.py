"""One writer per run folder: `OUT/.lock`, held with `flock` for the whole run.

Two runs into one `--out` would interleave their logs and overwrite each other's checkpoints and model, so
every trainer (and the demo) holds this lock from before its first check to its end; a second one is
refused with a one-line UserError naming the folder and the holder. The kernel drops an flock when its
holder exits, however it exits (SIGKILL included), so a dead run never leaves a stale lock: the file's
content (pid, host, start time) only names the holder in the refusal.

Multi-process (accelerate / torchrun) runs: only the main process (RANK 0) takes it. Within one process
the lock is re-entrant (`train_tokenizer` takes it, then the trainer's `fit` again).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from unicode_mllm.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not guarded there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
# A child forked below C code (no at-fork hook) would share the lock of a holder that exited: wait a little
# for it before refusing.
DEAD_HOLDER_WAIT_S = 10.0


def is_main_rank() -> bool:
    """Whether this is the main process of a distributed launch (or not distributed), before any Accelerator
    exists: torchrun and `accelerate launch` set RANK."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class _Held:
    fd: int
    depth: int
    created_folder: bool


_held: dict[Path, _Held] = {}
_guard = threading.Lock()


def _read_holder(fd: int) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        if isinstance(holder, dict):
            return holder
    return {}  # written a moment after its flock: the holder may not have filled it yet


def _alive_here(holder: dict[str, Any]) -> bool:
    """False only when the holder is known to have exited (same host, no such pid)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _refusal(folder: Path, holder: dict[str, Any]) -> UserError:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if "started" in holder:
        who += f", started {holder['started']}"
    if not _alive_here(holder):
        who += "; it exited, but a process it started still holds the lock"
    return UserError(
        f"{folder} is in use by another run ({who}); wait for it to end (or stop it), or use another --out"
    )


def _acquire(folder: Path) -> None:
    key = folder.resolve()
    with _guard:
        if key in _held:
            _held[key].depth += 1
            return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    deadline = time.monotonic() + DEAD_HOLDER_WAIT_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            if not _alive_here(holder) and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            raise _refusal(folder, holder) from None
        # The previous holder unlinks the file before it lets go: make sure ours is the one at `path`.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds")}
    with contextlib.suppress(OSError):  # the content only names the holder; a full disk must not stop the run
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    with _guard:
        _held[key] = _Held(fd, 1, created)


def _release(folder: Path) -> None:
    key = folder.resolve()
    with _guard:
        held = _held.get(key)
        if held is None:
            return
        held.depth -= 1
        if held.depth:
            return
        del _held[key]
    with contextlib.suppress(OSError):
        os.unlink(folder / LOCK_NAME)  # while still held (see _acquire's check)
    os.close(held.fd)
    if held.created_folder:
        with contextlib.suppress(OSError):
            folder.rmdir()  # a run refused before it wrote anything leaves no empty folder behind


def _forget_in_child() -> None:
    # A forked child (a DataLoader worker) must not keep the lock alive after its parent ends or lets go.
    for held in _held.values():
        with contextlib.suppress(OSError):
            os.close(held.fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class RunLock:
    """`with RunLock(out_dir):` the run's exclusive hold on `out_dir` (created if needed).

    Raises UserError when another live process holds it. `enabled=False` (the non-main ranks of a
    distributed run) makes it a no-op; the default asks `is_main_rank()`.
    """

    def __init__(self, folder: str | Path, enabled: bool | None = None):
        self.folder = Path(folder)
        self.enabled = (is_main_rank() if enabled is None else enabled) and fcntl is not None

    def __enter__(self) -> RunLock:
        if self.enabled:
            _acquire(self.folder)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            _release(self.folder)
