"""Problems of the machine rather than of the code, told as one line naming the path and the fix.

A full disk, a read-only or forbidden output folder, or a pickled weights file that torch's safe loader refuses
used to end in `error: internal error (...)` with exit status 1, as if the program were broken. The CLI's `main`
asks `environment_message(error)` for every exception it did not expect; a message means a user error (exit 2).

The path comes from the exception when it carries one (OSError.filename) and otherwise from the innermost frame
of the traceback that holds a file name: safetensors and torch raise their write errors without the path.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
from collections.abc import Iterator
from types import FrameType

# Local names under which the writers and loaders on the way down hold the file they were working on
# (safetensors' save_file: filename; torch.load: f; transformers: checkpoint_path, save_directory; ours: path).
_PATH_LOCALS = ("filename", "f", "checkpoint_path", "path", "tmp", "save_directory", "file", "out")
# Errors that carry an OSError only as text: Rust libraries (safetensors, tokenizers) write "... (os error 28)",
# a DataLoader worker's re-raised error quotes the worker's "OSError: [Errno 28] ...".
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
# torch.save reports a full disk as a failed write of its zip container, with no errno.
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "unexpected pos", "file write failed")

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS}
_FORBIDDEN = {errno.EACCES, errno.EPERM}


def environment_message(error: BaseException) -> str | None:
    """One line for an environment problem anywhere in `error`'s chain (cause and context), else None."""
    for exn in _chain(error):
        message = _message(exn, error)
        if message is not None:
            return message
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _message(exn: BaseException, outer: BaseException) -> str | None:
    if isinstance(exn, pickle.UnpicklingError) and "weights only" in str(exn).lower():
        path = _path_of(exn, outer) or "a weights file"
        return (
            f"{path} is a pickle that torch's safe weights-only loader refuses ({_unsupported(exn)}); "
            "convert it to safetensors on a machine where you trust it (load it and save_pretrained / "
            "safetensors' save_file), or pass a model saved as safetensors"
        )
    code = _errno_of(exn)
    if code is None:
        if isinstance(exn, RuntimeError) and any(text in str(exn) for text in _TORCH_WRITE_FAILED):
            path = _path_of(exn, outer) or "a file"
            return f"writing {path} failed (PyTorch's writer stopped mid-file); check that its disk has free space"
        return None
    path = _path_of(exn, outer) or "the output"
    if code in _NO_SPACE:
        what = "no space left" if code == errno.ENOSPC else "the disk quota is used up"
        return f"cannot write {path}: {what} on its device; free some space or write to another disk"
    if code in _READ_ONLY:
        return f"cannot write {path}: it is on a read-only file system; choose an output on a writable disk"
    if code in _FORBIDDEN:
        return f"permission denied for {path}; fix its permissions (chmod/chown) or choose another path"
    return None


def _errno_of(exn: BaseException) -> int | None:
    if isinstance(exn, OSError) and exn.errno is not None:
        return exn.errno
    match = _ERRNO_IN_TEXT.search(str(exn))
    return int(match.group(1) or match.group(2)) if match else None


def _unsupported(exn: BaseException) -> str:
    """torch's reason ('Unsupported global: GLOBAL x.Y ...') without its paragraphs of advice."""
    for line in str(exn).splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            reason = line.removeprefix("WeightsUnpickler error:").strip()
            return reason.split(" was not an allowed global")[0].split(". Please")[0]
    return "it holds more than tensors"


def _path_of(exn: BaseException, outer: BaseException) -> str | None:
    if isinstance(exn, OSError) and exn.filename is not None:
        return os.fsdecode(exn.filename) if isinstance(exn.filename, (str, bytes)) else str(exn.filename)
    for error in (exn, outer):
        for frame in _frames_innermost_first(error):
            for name in _PATH_LOCALS:
                path = _as_path(frame.f_locals.get(name))
                if path:
                    return path
    return None


def _frames_innermost_first(error: BaseException) -> list[FrameType]:
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames[::-1]


def _as_path(value: object) -> str | None:
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        return text if isinstance(text, str) and text and ("/" in text or "." in text) else None
    name = getattr(value, "name", None) if isinstance(value, io.IOBase) else None  # an open file
    return name if isinstance(name, str) and name else None
