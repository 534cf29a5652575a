"""The files a training run writes into its out_dir, shared by the three trainers (stage 0 names them otherwise:
`RunFileNames`).

    out_dir/.lock                 the run lock (run_lock.py), while a run is writing here
    out_dir/checkpoints/          `CheckpointManager` folders (step-N/, latest.json)
    out_dir/config.yaml           the resolved config, written when the run starts (and again on resume);
                                  a resume must match it (`check_resume_config`)
    out_dir/metrics.jsonl         one JSON object per line: training logs and evaluations, by step
    out_dir/curves.png            panels of metrics.jsonl (`plot`)
    out_dir/final_metrics.json    the run's last numbers
    out_dir/final/                the `save_pretrained` folder, swapped in whole (never half-written);
                                  it also holds train_config.yaml and, once the run ends, its model card
                                  README.md (`finish`, runtime/model_card.py)
    out_dir/trackers/             the experiment tracker's files with train.log_with (default train.log_dir)

Only the main process writes; the others call the same methods and return (`save_final` waits for
every process first, so the weights it saves are the ones all ranks agree on).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from unicode_mllm.config import dump_config
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.checkpoint import (
    CheckpointManager,
    atomic_write_text,
    refuse_to_overwrite,
    remove_temp_entries,
    replace_dir,
    write_errors_as_user_errors,
)
from unicode_mllm.runtime.model_card import write_model_card
from unicode_mllm.runtime.run_lock import RunLock
from unicode_mllm.runtime.trackers import end_trackers, log_image, log_row, start_trackers
from unicode_mllm.shard_manifest import MANIFEST_NAME, read_manifest
from unicode_mllm.viz import plot_curves, read_jsonl

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
CONFIG_FILENAME = "config.yaml"
METRICS_FILENAME = "metrics.jsonl"
CURVES_FILENAME = "curves.png"
FINAL_METRICS_FILENAME = "final_metrics.json"
FINAL_DIRNAME = "final"
FINAL_CONFIG_FILENAME = "train_config.yaml"


@dataclass(frozen=True)
class RunFileNames:
    """What a run folder's files are called: stages 1 and 2 use these defaults, stage 0 its own names."""

    config: str = CONFIG_FILENAME
    metrics: str = METRICS_FILENAME
    curves: str = CURVES_FILENAME
    final_metrics: str = FINAL_METRICS_FILENAME
    final: str = FINAL_DIRNAME
    final_config: str = FINAL_CONFIG_FILENAME


# Settings a resumed run may change without --allow-changed: they decide how long the run goes, what it logs,
# evaluates and keeps, where it is and how many threads it uses, never which samples a step sees or what it
# computes from them (the LR schedule's length is restored from the checkpoint, so train.steps only moves the
# end). Deliberately not here: data.num_workers, because the shards are split between the DataLoader workers,
# so another worker count gives another sample order and the saved position (batches taken) would point
# elsewhere in the epoch; train.device and mixed_precision, which change the numbers.
RESUME_MAY_CHANGE = frozenset(
    {
        "train.steps",
        "train.max_minutes",
        "train.log_every",
        "train.eval_every",
        "train.eval_batches",
        "train.ckpt_every",
        "train.keep_checkpoints",
        "train.keep_last",  # stage 0's name for keep_checkpoints
        "train.num_threads",
        "train.log_with",  # where the curves also go (experiment trackers), never what is trained
        "train.log_dir",
        "train.out_dir",  # where the run is, which --out or a moved folder may change
    }
)
_ABSENT = object()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def _short(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume_config(saved: str | Path, cfg: Any, allow_changed: Iterable[str] = ()) -> None:
    """Refuse (one-line UserError listing each changed key as old -> new) to resume a run whose config differs
    from the one it saved in `saved` (its config.yaml), except the keys in RESUME_MAY_CHANGE and those in
    `allow_changed` (a key, or a section such as `optim`). Every stage checks this way; a missing file is a
    warning (nothing to compare with)."""
    saved = Path(saved)
    allow = tuple(allow_changed)
    new = _flatten(yaml.safe_load(dump_config(cfg)))  # the same YAML round trip as the saved file's
    for key in allow:
        if not any(k == key or k.startswith(key + ".") for k in new):
            raise UserError(f"--allow-changed {key}: this config has no such key (keys look like optim.lr)")
    if not saved.is_file():
        log.warning("%s is missing, so the resumed settings cannot be compared with the run's", saved)
        return
    try:
        old = _flatten(yaml.safe_load(saved.read_text()))
    except yaml.YAMLError as e:
        raise UserError(f"{saved} is damaged ({type(e).__name__}); restore it to resume that run") from None
    changed = [
        key
        for key in sorted(set(old) | set(new))
        if old.get(key, _ABSENT) != new.get(key, _ABSENT)
        and key not in RESUME_MAY_CHANGE
        and not any(key == a or key.startswith(a + ".") for a in allow)
    ]
    if changed:
        listed = ", ".join(f"{k} {_short(old.get(k, _ABSENT))} -> {_short(new.get(k, _ABSENT))}" for k in changed)
        raise UserError(
            f"cannot resume {saved.parent} with other settings than its {saved.name}: {listed}; resume with the "
            f"run's settings, pass --allow-changed KEY for each change you mean, or train into another --out"
        )


def remove_leftovers(out_dir: str | Path) -> None:
    """Delete the temporary files and folders that interrupted writes left in out_dir and its checkpoints
    (a killed save, a killed final-model swap). Only under the run lock: no other writer is alive."""
    out_dir = Path(out_dir)
    remove_temp_entries(out_dir, only_dead_writers=False)
    CheckpointManager(out_dir / CHECKPOINTS_DIRNAME).remove_leftovers()


def check_out_dir(out_dir: str | Path, resume: bool | str, final_dirname: str = FINAL_DIRNAME) -> None:
    """Before anything loads: a fresh run must not overwrite another run, and `resume=True` needs a checkpoint.

    Shared by every stage, so they refuse (and resume) alike; `resume` may also be an explicit step folder.
    """
    out_dir = Path(out_dir)
    checkpoints = CheckpointManager(out_dir / CHECKPOINTS_DIRNAME)
    if not resume:
        refuse_to_overwrite(out_dir, checkpoints, out_dir / final_dirname)
    elif resume is True and not checkpoints.exists():
        raise checkpoints.no_checkpoint_error()


def start_run(
    out_dir: str | Path,
    resume: bool | str,
    cfg: Any,
    allow_changed: Iterable[str] = (),
    *,
    is_main: bool = True,
    config_name: str = CONFIG_FILENAME,
    final_dirname: str = FINAL_DIRNAME,
) -> None:
    """What every stage does first, under its run lock, before anything loads: refuse to overwrite a run or to
    resume without a checkpoint (`check_out_dir`), refuse a resume with changed settings (`check_resume_config`
    against out_dir/`config_name`), and remove what interrupted writes left (main process)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume, final_dirname)
    if is_main:
        if resume:
            check_resume_config(out_dir / config_name, cfg, allow_changed)
        remove_leftovers(out_dir)


def check_splits(data_dir: str | Path, splits_by_key: Mapping[str, Sequence[str]]) -> None:
    """Before step 1: every split the config trains or evaluates on must be in the shards' manifest, or the
    run would fail only at its first evaluation, with the steps before it lost. `splits_by_key`: config key ->
    the split names it gives."""
    manifest = read_manifest(data_dir)
    for key, names in splits_by_key.items():
        for name in names:
            if name not in manifest.splits:
                where = manifest.root / MANIFEST_NAME
                raise UserError(
                    f"{key} names split {name!r}, but {where} has only {sorted(manifest.splits)}; "
                    f"write that split into {data_dir} or set {key} to splits it holds"
                )


class RunFiles:
    """Writes the run's config, metric log, curves, final metrics and final model folder (main process only)."""

    def __init__(self, out_dir: str | Path, accelerator: Accelerator, cfg: Any, names: RunFileNames = RunFileNames()):
        self.out_dir = Path(out_dir)
        self.accelerator = accelerator
        self.cfg = cfg  # a dataclass config, saved with `dump_config`
        self.names = names
        self.rows: list[dict[str, Any]] = []  # metrics.jsonl's rows so far (main process): `trim_metrics`, `log`

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / self.names.metrics

    @property
    def final_metrics_path(self) -> Path:
        return self.out_dir / self.names.final_metrics

    def lock(self) -> RunLock:
        """The run lock on out_dir, taken by the main process only."""
        return RunLock(self.out_dir, enabled=self.accelerator.is_main_process)

    def start(self, resume: bool | str, allow_changed: Iterable[str] = ()) -> None:
        """`start_run` for this run's folder and config, then the experiment trackers (train.log_with)."""
        start_run(
            self.out_dir,
            resume,
            self.cfg,
            allow_changed,
            is_main=self.accelerator.is_main_process,
            config_name=self.names.config,
            final_dirname=self.names.final,
        )
        start_trackers(self.accelerator, self.cfg)

    def write_config(self) -> None:
        """Create out_dir and write the config (config.yaml); on resume too: the settings a resume was allowed to
        change are the run's from now on."""
        if self.accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / self.names.config, dump_config(self.cfg))

    def trim_metrics(self, step: int) -> None:
        """Keep only the metrics.jsonl rows up to `step` (`rows`): a resumed run drops what the stopped run logged
        after its checkpoint (and a fresh one what a run that died before its first checkpoint left), so no step
        appears twice in the log or the curves. A line cut by a crash or a full disk is dropped, not fatal to the
        resume."""
        if not self.accelerator.is_main_process or not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict) and row.get("step", 0) <= step:
                    kept.append(row)
        atomic_write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept))
        self.rows = kept

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one JSON row to metrics.jsonl, and its numbers to the experiment trackers at its step."""
        log_row(self.accelerator, row)  # no-op without trackers; accelerate logs from the main process only
        if not self.accelerator.is_main_process:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(dict(row))

    def log_image(self, name: str, path: Path, step: int) -> None:
        """An image the run wrote (a reconstruction grid) to the experiment trackers; no-op without them."""
        if path.is_file():
            log_image(self.accelerator, name, path, step)

    def finish(self, stage: str, final: Path, **card: Any) -> None:
        """The end of a run: the model card final/README.md (from config and final_metrics.json; `card`:
        `render_card`'s options) and the trackers finished. stage: 'lm', 'tokenizer' or 'mllm' (model_card.py)."""
        if self.accelerator.is_main_process and final.is_dir():
            write_model_card(final, stage, self.cfg, self.final_metrics_path, **card)
        end_trackers(self.accelerator)

    def plot(self, panels: dict[str, Sequence[str]], log_scale: Sequence[str] = ()) -> Path | None:
        """curves.png from metrics.jsonl (`viz.plot_curves` panels: title -> metric keys); None before any log."""
        if not self.metrics_path.is_file():
            return None
        curves = self.out_dir / self.names.curves
        return plot_curves(read_jsonl(self.metrics_path), panels, curves, log_scale=log_scale)

    def write_final_metrics(self, metrics: Mapping[str, Any]) -> None:
        """final_metrics.json (indented JSON, keys in the given order)."""
        if self.accelerator.is_main_process:
            atomic_write_text(self.final_metrics_path, json.dumps(metrics, indent=2) + "\n")

    def save_final(self, save: Callable[[Path], None]) -> Path:
        """`save(tmp)` writes the model into out_dir/.final.tmp, which then replaces out_dir/final; returns final.

        train_config.yaml is added to the folder before the swap, so the model and its config arrive together.
        """
        final = self.out_dir / self.names.final
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            tmp = self.out_dir / f".{self.names.final}.tmp"
            with write_errors_as_user_errors(f"the final model {final}", "free space and rerun with --resume"):
                shutil.rmtree(tmp, ignore_errors=True)
                save(tmp)
                atomic_write_text(tmp / self.names.final_config, dump_config(self.cfg))
                replace_dir(tmp, final)  # a crash leaves the old or the new folder, never half of one
        return final
