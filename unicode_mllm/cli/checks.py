"""Checks of command-line options that run before any model is loaded or any work starts.

A typo or an unwritable output then costs nothing and loses nothing: each check raises a one-line UserError naming
the option, the value and the fix, which the CLI prints with exit status 2.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from unicode_mllm.errors import UserError

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")  # the shard writer's rule for split names (shard file prefixes)


def check_at_least(value: int, minimum: int, option: str) -> None:
    if value < minimum:
        raise UserError(f"{option} must be >= {minimum}, got {value}")


def check_split_name(split: str) -> None:
    if not _SPLIT_NAME.match(split):
        raise UserError(f"--split {split!r} must match [A-Za-z0-9_]+ (it names the shard files); e.g. --split train")


def _unwritable_reason(path: Path, folder: bool) -> str | None:
    """Why `path` (a file, or a folder when `folder`) could not be written, or None when it can."""
    if path.exists():
        if folder != path.is_dir():
            return "it is a file, not a folder" if folder else "it is a folder, not a file"
        target = path
    else:
        target = path.parent
        while not target.exists():  # the nearest existing ancestor is where the missing folders get made
            target = target.parent
        if not target.is_dir():
            return f"{target} is a file, not a folder"
    if os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
        return None
    read_only = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
    return f"{target} is on a read-only file system" if read_only else f"no write permission for {target}"


def ensure_writable_output(path: Path | None, option: str, *, folder: bool = False) -> None:
    """UserError naming the path and the option to change when an output cannot be written; None is skipped."""
    if path is None:
        return
    reason = _unwritable_reason(path, folder)
    if reason is not None:
        raise UserError(f"cannot write {option} {path}: {reason}; choose another {option}")


def check_image_files(paths: list[Path], option: str) -> None:
    """Decode each image given on the command line (each distinct file once) before any model loads: a folder, a
    typo or a corrupt file is then one line naming the option and the path, and costs nothing."""
    from unicode_mllm.data.image_io import load_image

    for path in dict.fromkeys(paths):
        try:
            load_image(path)
        except UserError as exn:
            raise UserError(f"{option} {exn}") from None


def check_lpips_trunk(trunk: str) -> None:
    """--lpips-trunk: auto, none and random are words; anything else must be a VGG16 weights file."""
    if trunk in ("auto", "none", "random"):
        return
    path = Path(trunk).expanduser()
    if not path.is_file():
        raise UserError(
            f"--lpips-trunk {trunk} not found; pass a VGG16 weights file (torchvision's vgg16-397923af.pth), "
            "auto or none"
        )
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # files in torch's legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            state = None
    if not isinstance(state, dict) or not any(str(k).startswith("features.") for k in state):
        raise UserError(
            f"--lpips-trunk {trunk} is not a VGG16 weights file (torchvision's vgg16-397923af.pth); "
            "pass that file, auto or none"
        )


def check_sampling(
    temperature: float, top_k: int | None, top_p: float | None, depth_temperatures: tuple[float, ...] | None = None
) -> None:
    from unicode_mllm.generation.sampling import SamplingSettings

    SamplingSettings(temperature, top_k, top_p, depth_temperatures)  # UserError: out of range, NaN or inf
