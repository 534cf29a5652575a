"""Experiment trackers (`train.log_with: none|tensorboard|wandb|aim`, `train.log_dir`) through accelerate.

The trainers build their Accelerator with `accelerator_kwargs(cfg.train, out_dir)` (accelerate's `log_with` and
`project_dir`), start the trackers with `start_trackers` (accelerate's `init_trackers`, the config as
hyperparameters), send every metrics.jsonl row through `log_row` (accelerate's `log`, at the row's step, so the
tracker's curves are metrics.jsonl's) and images through `log_image`, and stop them with `end_trackers`. With
`log_with: none` (the default) every call here does nothing.

`end_trackers` finishes each tracker as accelerate's `end_training` does, without its other half (destroying the
process group): the demo and the ablation run several stages in one process, and a distributed launch keeps its
group across them (runtime/accelerator.py).

The tracker packages are optional extras: `pip install 'unicode-mllm[tensorboard]'` (or `[wandb]`, `[aim]`);
a missing one is a one-line UserError naming the extra, before any model loads.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from unicode_mllm.errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

TrackerChoice = Literal["none", "tensorboard", "wandb", "aim"]
TRACKERS: tuple[str, ...] = ("none", "tensorboard", "wandb", "aim")
DEFAULT_LOG_DIRNAME = "trackers"  # out_dir/trackers when train.log_dir is not set
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "aim": "aim"}  # the module each tracker imports
# The project (TensorBoard: the sub-folder of log_dir) each stage's config logs under.
_PROJECTS = {"LMTrainConfig": "stage0-lm", "TokenizerTrainConfig": "stage1-tokenizer", "MLLMTrainConfig": "stage2-mllm"}


def check_tracker(log_with: str) -> None:
    """UserError (one line) for an unknown tracker or one whose package is not installed, naming the extra."""
    if log_with not in TRACKERS:
        raise UserError(f"train.log_with={log_with!r} is unknown; choose one of {list(TRACKERS)}")
    if log_with != "none" and importlib.util.find_spec(_PACKAGE[log_with]) is None:
        raise UserError(
            f"train.log_with={log_with} needs the {_PACKAGE[log_with]} package: pip install 'unicode-mllm[{log_with}]'"
        )


def log_dir(train: Any, out_dir: str | Path) -> Path:
    """train.log_dir, or out_dir/trackers."""
    configured = getattr(train, "log_dir", None)
    return Path(configured) if configured else Path(out_dir) / DEFAULT_LOG_DIRNAME


def accelerator_kwargs(train: Any, out_dir: str | Path) -> dict[str, Any]:
    """`Accelerator` keyword arguments for `train.log_with` ({} for none); checks the package first."""
    log_with = getattr(train, "log_with", "none")
    check_tracker(log_with)
    if log_with == "none":
        return {}
    return {"log_with": log_with, "project_dir": str(log_dir(train, out_dir))}


def start_trackers(accelerator: Accelerator, cfg: Any) -> None:
    """accelerate's `init_trackers` with the flattened config as hyperparameters (no-op without trackers)."""
    if not accelerator.log_with:
        return
    project = _PROJECTS.get(type(cfg).__name__, "unicode-mllm")
    accelerator.init_trackers(project, config=hyperparameters(cfg))
    log.info("logging to %s under %s", ", ".join(t.name for t in accelerator.trackers), project)


def hyperparameters(cfg: Any) -> dict[str, bool | int | float | str]:
    """The config as flat `section.key` scalars (what every tracker's hyperparameter table takes)."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(node: Any, prefix: str) -> None:
        if is_dataclass(node) and not isinstance(node, type):
            for f in fields(node):
                walk(getattr(node, f.name), f"{prefix}{f.name}.")
        elif isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            key = prefix[:-1]
            flat[key] = node if isinstance(node, bool | int | float | str) else str(node)

    walk(cfg, "")
    return flat


def log_row(accelerator: Accelerator, row: Mapping[str, Any]) -> None:
    """The row's numbers (not its step, nested or text entries) at its step; no-op without trackers."""
    if not accelerator.trackers or "step" not in row:
        return
    scalars = {
        key: value
        for key, value in row.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    }
    if scalars:
        accelerator.log(scalars, step=int(row["step"]))


def log_image(accelerator: Accelerator, name: str, path: str | Path, step: int) -> None:
    """An image file written by the run (a reconstruction grid) as an image at `step`; no-op without trackers."""
    if not accelerator.trackers or not accelerator.is_main_process:
        return
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: np.asarray(rgb)[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [rgb]}, step=step)
        else:
            tracker.log_images({name: rgb}, step=step)


def end_trackers(accelerator: Accelerator) -> None:
    """Finish every tracker (accelerate's `end_training`, keeping the process group; see the module docstring)."""
    for tracker in accelerator.trackers:
        tracker.finish()
