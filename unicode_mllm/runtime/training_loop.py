"""The training skeleton of every stage: the loop, its cadence, Ctrl-C, the time budget and exact checkpoints.

A stage (stage 0 `stages/lm/pretrain.py`, stage 1 `stages/tokenizer/trainer.py`, stage 2 `stages/mllm/trainer.py`) is a
`TrainingStage`: it says what one optimizer step does (`run_step`), what a log or eval step records (`record`),
what its checkpoints hold (`checkpoint_contents`, `checkpoint_layout`, `load_state`), what it checks and loads
before step 1 (`prepare_run`) and what it exports at the end (`finish`). The skeleton owns the rest:

    run_stage(TokenizerTrainer, cfg, out_dir, resume, allow_changed)   # lock, start_run, fit
    fit: refuse / check / clean the run folder (RunFiles.start), prepare_run, config + trimmed metrics log,
         the loop to train.steps, the final checkpoint, finish
    per step: Ctrl-C -> save and stop; run_step; record at log / eval steps; a checkpoint every ckpt_every
         steps; the progress bar; train.max_minutes -> save and stop (the same step on every rank)

Checkpoints are written once per step (the end of `fit` follows the loop's own save), by the main process or,
under FSDP and DeepSpeed, by every rank together (`model_and_optimizer`); each holds every RNG, so a resumed run
logs the same losses as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator

from unicode_mllm.errors import UserError
from unicode_mllm.runtime.accelerator import is_deepspeed, is_fsdp
from unicode_mllm.runtime.checkpoint import (
    Checkpoint,
    CheckpointLayout,
    CheckpointManager,
    join_tensors,
    load_shard,
    split_tensors,
)
from unicode_mllm.runtime.progress import make_progress
from unicode_mllm.runtime.run_files import RunFileNames, RunFiles, start_run
from unicode_mllm.runtime.run_lock import RunLock, is_main_rank
from unicode_mllm.runtime.seeding import capture_rng_state, restore_rng_state
from unicode_mllm.runtime.sharded import (
    check_zero_launch,
    gather_optimizer_state,
    gather_tensors,
    load_full_optimizer_state,
    load_zero_partition_state,
    zero_launch,
    zero_partition_state,
)
from unicode_mllm.runtime.time_budget import out_of_time

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cadence:
    """When a step logs, evaluates and saves a checkpoint (the last step always logs and evaluates; the end of
    the run always saves), and the wall-time budget (None or 0: none)."""

    steps: int
    log_every: int
    eval_every: int
    ckpt_every: int
    max_minutes: float | None = None

    @classmethod
    def of(cls, train: Any) -> Cadence:
        """From a stage config's `train` section (stage 0 has no max_minutes: its steps bound it)."""
        max_minutes = getattr(train, "max_minutes", None)
        return cls(train.steps, train.log_every, train.eval_every, train.ckpt_every, max_minutes)

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.steps

    def evaluates(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.steps

    def checkpoints(self, step: int) -> bool:
        return step % self.ckpt_every == 0


class StopOnInterrupt:
    """Ctrl-C during training: let the current step finish, so the caller can save a consistent checkpoint
    and stop (`requested`); a second Ctrl-C interrupts at once. Single-process runs only: ranks that stop at
    different steps would wait on each other, so multi-process runs keep the default behaviour."""

    def __init__(self, accelerator: Accelerator):
        self.enabled = accelerator.num_processes == 1 and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __enter__(self) -> StopOnInterrupt:
        if self.enabled:
            previous = signal.signal(signal.SIGINT, self._handle)
            self._previous = previous if previous is not None else signal.default_int_handler
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)

    def stop(self, step: int, checkpoint: Path | None) -> None:
        """Raise KeyboardInterrupt (the CLI exits 130) after saying where the run can be resumed from."""
        log.warning("interrupted at step %d; checkpoint saved to %s; rerun with --resume to continue", step, checkpoint)
        raise KeyboardInterrupt


def check_loss(loss: float, step: int) -> None:
    """UserError when a step's loss is NaN or infinite (training on would only spread it)."""
    if not math.isfinite(loss):
        raise UserError(f"loss became {loss} at step {step}; lower optim.lr or check data")


# ----- checkpoint contents ------------------------------------------------------------------------------


@dataclass
class CheckpointContents:
    """What one rank gives a step folder: tensor groups and state.json (they count on the main process only),
    and under DeepSpeed this rank's own ZeRO partitions of the optimizer (`local`, optimizer.rank{R}.safetensors,
    written by every rank)."""

    tensors: Mapping[str, Mapping[str, torch.Tensor]]
    state: dict[str, Any]
    local: Mapping[str, torch.Tensor] | None = None


def model_and_optimizer(
    accelerator: Accelerator,
    weights: Callable[[], Iterable[tuple[str, torch.Tensor]]],
    optimizer: Any,
    group: str,
    run_state: dict[str, Any],
    optimizer_prefix: str = "",
) -> CheckpointContents | None:
    """The contents of a checkpoint of `weights()` (the tensor group `group`) and a prepared `optimizer` under
    any launch; None on a rank that writes nothing. Called on every rank, in the same order (the gathers are
    collectives): the same files whoever wrote them.

    DeepSpeed: the full fp32 weights (gathered to the main process) and each rank's own ZeRO partitions of the
    optimizer, readable by the same launch only (`load_optimizer`). FSDP: the full weights and optimizer state,
    gathered to the main process. DDP or one process: the main process's own. `optimizer_prefix` names the
    optimizer's tensors in optimizer.safetensors (`split_tensors`).
    """
    main = accelerator.is_main_process
    if is_deepspeed(accelerator):
        tensors = gather_tensors(weights(), main)
        tree, local = split_tensors(zero_partition_state(optimizer.optimizer), "zero")
        state = {"optimizer": {"zero": zero_launch(accelerator), "partitions": tree}, **run_state}
        return CheckpointContents({group: tensors}, state, local)
    if is_fsdp(accelerator):
        tensors, optimizer_state = gather_tensors(weights(), main), gather_optimizer_state(optimizer, main)
    elif main:
        tensors = {name: tensor.detach() for name, tensor in weights()}
        optimizer_state = optimizer.state_dict()
    if not main:
        return None
    tree, optimizer_tensors = split_tensors(optimizer_state, optimizer_prefix)
    return CheckpointContents({group: tensors, "optimizer": optimizer_tensors}, {"optimizer": tree, **run_state})


def load_optimizer(accelerator: Accelerator, optimizer: Any, checkpoint: Checkpoint) -> None:
    """The optimizer state of a checkpoint `model_and_optimizer` wrote, on every rank, after `prepare` (torch
    moves the AdamW moments onto the parameters' device): under DeepSpeed this rank's own ZeRO partitions (the
    launch must be the one that wrote them: `check_zero_launch`), else the full state, each rank keeping its
    FSDP slice of it."""
    saved = checkpoint.state["optimizer"]
    if is_deepspeed(accelerator):
        check_zero_launch(saved.get("zero") if isinstance(saved, dict) else None, accelerator, checkpoint.path)
        local = load_shard(checkpoint.path, "optimizer", accelerator.process_index)
        load_zero_partition_state(optimizer.optimizer, join_tensors(saved["partitions"], local))
    else:
        load_full_optimizer_state(optimizer, join_tensors(saved, checkpoint.tensors.get("optimizer", {})))


# ----- the stage -------------------------------------------------------------------------------------------


class TrainingStage(ABC):
    """One stage's run on the shared loop. A subclass sets `cfg`, `accelerator`, `ckpt` (its CheckpointManager),
    `files` (its RunFiles) and `step` in its constructor, and implements the hooks below; every hook runs on every
    rank."""

    description: ClassVar[str]  # the progress bar's, e.g. "stage 1: tokenizer"
    file_names: ClassVar[RunFileNames] = RunFileNames()
    cfg: Any  # the stage's config dataclass; its `train` section gives the `Cadence`
    accelerator: Accelerator
    ckpt: CheckpointManager
    files: RunFiles
    step: int
    started: float  # when this run's loop started (time.perf_counter()): its logged seconds and time budget
    _saved: tuple[int, Path | None] | None = None  # (step, folder) of the last checkpoint written or loaded

    # ----- hooks ---------------------------------------------------------------------------------------------

    @abstractmethod
    def prepare_run(self, resume: bool | str) -> None:
        """Before step 1, after the run folder was checked: load the checkpoint when `resume` (True: the latest,
        or a step folder) and check what the run reads."""

    @abstractmethod
    def run_step(self) -> dict[str, Any]:
        """One optimizer step (`step` + 1); returns its logs."""

    @abstractmethod
    def record(self, logs: dict[str, Any], *, log_step: bool, eval_step: bool) -> None:
        """What a log step and an eval step write (metrics rows, evaluations, images)."""

    @abstractmethod
    def progress_stats(self, logs: dict[str, Any]) -> str:
        """The progress bar's figures after a step, e.g. 'loss 3.214 lr 1.0e-03'."""

    @abstractmethod
    def checkpoint_contents(self) -> CheckpointContents | None:
        """This rank's part of the step's checkpoint (the skeleton adds the RNG state); None: nothing to write."""

    @abstractmethod
    def checkpoint_layout(self) -> CheckpointLayout:
        """What a step folder of this run holds: resuming checks it whole and falls back past a damaged one."""

    @abstractmethod
    def load_state(self, checkpoint: Checkpoint) -> None:
        """Restore the weights, optimizer, schedule and data position of `checkpoint` (the skeleton restores the
        step and the RNG)."""

    @abstractmethod
    def finish(self) -> Any:
        """After the last checkpoint: the final checks, model and metrics; returns what `fit` returns."""

    def stopped_early(self, step: int) -> None:
        """When train.max_minutes stopped the run after `step` (its checkpoint follows); by default nothing more."""
        return None

    def cadence(self) -> Cadence:
        """When to log, evaluate and save: the config's `train` section says."""
        return Cadence.of(self.cfg.train)

    # ----- checkpoints ---------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Save this step's checkpoint, unless it is the one just saved or loaded (a step folder is never
        written twice: the end of `fit` follows the loop's own save). The folder on the main process, None
        elsewhere."""
        if self._saved is not None and self._saved[0] == self.step:
            return self._saved[1]
        acc = self.accelerator
        acc.wait_for_everyone()
        contents = self.checkpoint_contents()
        path = None
        if contents is not None:
            state = {**contents.state, "rng": capture_rng_state()}
            if contents.local is not None:  # every rank writes its own partitions into the same folder
                path = self.ckpt.save_collective(self.step, contents.tensors, state, "optimizer", contents.local)
            else:
                path = self.ckpt.save(self.step, contents.tensors, state)
        self._saved = (self.step, path if acc.is_main_process else None)
        return self._saved[1]

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        """Continue from the checkpoint in `path` (None: the latest usable one)."""
        checkpoint = self.ckpt.load(path, layout=self.checkpoint_layout())
        self.restore(checkpoint)
        log.info("resumed from %s (step %d)", checkpoint.path, checkpoint.step)

    def restore(self, checkpoint: Checkpoint) -> None:
        """The stage's state (`load_state`), the step and every RNG as `checkpoint` saved them."""
        self.load_state(checkpoint)
        self.step = checkpoint.step
        self._saved = (checkpoint.step, checkpoint.path)
        restore_rng_state(checkpoint.state["rng"])

    # ----- the run -------------------------------------------------------------------------------------------

    def fit(self, resume: bool | str = False, allow_changed: Sequence[str] = ()) -> Any:
        """Train to `train.steps` under the run lock; `resume` (True or a step folder) continues the run in
        out_dir, whose config the config must match but for `allow_changed` keys (`check_resume_config`)."""
        with self.files.lock():
            if resume or self.step == 0:  # a trainer that has stepped or loaded continues its own run
                self.files.start(resume, allow_changed)
            self.prepare_run(resume)
            self.files.write_config()
            self.files.trim_metrics(self.step)
            self.started = time.perf_counter()
            self.loop(self.cadence())
            self.save_checkpoint()
            return self.finish()

    def loop(self, cadence: Cadence) -> None:
        """The loop to `cadence.steps`: stops early (after saving) on Ctrl-C or train.max_minutes."""
        acc = self.accelerator
        with make_progress(disable=not acc.is_main_process) as progress, StopOnInterrupt(acc) as interrupt:
            task = progress.add_task(self.description, total=cadence.steps, completed=self.step, stats="")
            while self.step < cadence.steps:
                if interrupt.requested:  # single process only (StopOnInterrupt)
                    interrupt.stop(self.step, self.save_checkpoint())
                logs = self.run_step()
                step = self.step
                self.record(logs, log_step=cadence.logs(step), eval_step=cadence.evaluates(step))
                if cadence.checkpoints(step):
                    self.save_checkpoint()
                progress.update(task, completed=step, stats=self.progress_stats(logs))
                if out_of_time(self.started, cadence.max_minutes, acc.device):  # the same step on every rank
                    log.warning(
                        "train.max_minutes=%s reached at step %d: saving and stopping", cadence.max_minutes, step
                    )
                    self.stopped_early(step)
                    break


def run_stage(
    trainer_class: type[TrainingStage],
    cfg: Any,
    out_dir: str | Path | None,
    resume: bool | str,
    allow_changed: Sequence[str],
) -> Any:
    """A stage's run: under the run lock of out_dir (default `cfg.train.out_dir`), `start_run` (with the run
    folder's file names, `trainer_class.file_names`) before any model loads, then `trainer_class(cfg,
    out_dir).fit(...)`; returns what `fit` returns.

    Raises UserError for a folder another run is writing (the run lock), a fresh run into a folder holding
    checkpoints or a final model, `resume` without a usable checkpoint, and a resume whose config differs from
    the run's saved config in other keys than `allow_changed` and those safe to change (run_files.RESUME_MAY_CHANGE)."""
    out = Path(out_dir or cfg.train.out_dir)
    names = trainer_class.file_names
    with RunLock(out):
        start_run(
            out, resume, cfg, allow_changed, is_main=is_main_rank(), config_name=names.config, final_dirname=names.final
        )
        return trainer_class(cfg, out_dir).fit(resume=resume, allow_changed=allow_changed)  # type: ignore[call-arg]
