"""Stage 1: train the visual tokenizer on image reconstruction with a codebook tied to the LLM's words.

A `TrainingStage` of the shared loop (runtime/training_loop.py): the encoder/decoder under the configured
mixed precision while the quantizer stays fp32 (its adapter disables autocast), two optimizers (generator,
discriminator), gradient clipping, the blend schedule after every step, DDP with `broadcast_buffers=False` and
EMA statistics all-reduced by the quantizer, periodic atomic checkpoints with exact resume, logs (JSONL + curves
PNG + reconstruction grids) and a final `save_pretrained`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.optim.lr_scheduler import LambdaLR
from torchvision.utils import make_grid, save_image

from unicode_mllm.data.batches import DataPosition, EpochBatches
from unicode_mllm.data.image_policy import check_fixed_size
from unicode_mllm.data.stream import SkipReport, StreamingDataset, collate
from unicode_mllm.errors import UserError
from unicode_mllm.image_metrics import psnr
from unicode_mllm.quantizer_settings import QuantizerSettings
from unicode_mllm.runtime.accelerator import stage_accelerator
from unicode_mllm.runtime.checkpoint import (
    Checkpoint,
    CheckpointLayout,
    CheckpointManager,
    join_tensors,
    split_tensors,
    tensor_shapes,
)
from unicode_mllm.runtime.devices import accelerate_precision, select_device
from unicode_mllm.runtime.lr_schedule import WarmupCosine
from unicode_mllm.runtime.optimizer import adamw_decaying_matrices
from unicode_mllm.runtime.run_files import RunFiles, check_splits
from unicode_mllm.runtime.seeding import seed_everything
from unicode_mllm.runtime.trackers import accelerator_kwargs
from unicode_mllm.runtime.training_loop import CheckpointContents, TrainingStage, check_loss, run_stage
from unicode_mllm.shard_manifest import read_manifest
from unicode_mllm.stages.tokenizer.blend_schedule import BlendSchedule
from unicode_mllm.stages.tokenizer.config import OptimConfig, TokenizerTrainConfig
from unicode_mllm.stages.tokenizer.losses import VQGANLoss
from unicode_mllm.stages.tokenizer.usage import UsageWindow
from unicode_mllm.visual_tokenizer import LanguageCodebook, should_sync_codebook
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

log = logging.getLogger(__name__)


@dataclass
class TokenizerTrainResult:
    final_dir: Path
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)


def _accelerator(cfg: TokenizerTrainConfig, out_dir: Path) -> Accelerator:
    device = cfg.train.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device='cuda' but CUDA is not available here; use train.device=auto or cpu")
    return stage_accelerator(
        "train-tokenizer",
        no_fsdp_reason=": its codebook EMA statistics are all-reduced across whole replicas, so stage 1 runs under DDP",
        cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()),
        mixed_precision=accelerate_precision(cfg.train.mixed_precision, select_device(device)),
        # The codebook lives in buffers that the quantizer all-reduces itself; DDP must not re-send them.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        **accelerator_kwargs(cfg.train, out_dir),  # train.log_with's tracker (runtime/trackers.py)
    )


def build_tokenizer(cfg: TokenizerTrainConfig, sync_codebook: bool) -> tuple[VisualTokenizer, LanguageCodebook]:
    """The language codebook C_L from `codebook.llm` and a fresh tokenizer with C_L installed."""
    if not cfg.codebook.llm:
        raise UserError(
            "codebook.llm is empty: set it to the LLM folder or name (e.g. --set codebook.llm=runs/lm/final)"
        )
    language = LanguageCodebook.from_pretrained(
        cfg.codebook.llm, policy=cfg.codebook.policy, min_norm=cfg.codebook.min_norm, max_codes=cfg.codebook.max_codes
    )
    kwargs = {**tokenizer_kwargs(cfg), "sync_codebook": sync_codebook}
    return VisualTokenizer.from_language_codebook(language, **kwargs), language


def tokenizer_kwargs(cfg: TokenizerTrainConfig) -> dict[str, Any]:
    """`VisualTokenizer.from_language_codebook`'s settings from a stage-1 config (the model's shape and codebook)."""
    m, c = cfg.model, cfg.codebook
    kwargs: dict[str, Any] = dict(
        image_size=m.image_size,
        ch=m.ch,
        ch_mult=m.ch_mult,
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=m.attn_resolutions,
        z_channels=m.z_channels,
        dropout=m.dropout,
        stacking=m.stacking,
        depth=m.depth if m.stacking == "rq" else None,
        llm_name_or_path=str(c.llm),
        quantizer=QuantizerSettings.of(c),  # `codebook:` extends the quantizer's settings: passed whole
    )
    if c.mode == "separate":
        kwargs["num_codes"] = c.separate_num_codes
    return kwargs


def _lr_scheduler(
    optimizer: torch.optim.Optimizer, o: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant or cosine down to `min_lr_ratio` at the last step."""
    min_ratio = o.min_lr_ratio if o.lr_schedule == "cosine" else 1.0
    return LambdaLR(optimizer, WarmupCosine(o.warmup_steps, total_steps, min_ratio))


class TokenizerTrainer(TrainingStage):
    """Owns the models, optimizers, data and logs of one stage-1 run (usable step by step in tests)."""

    description = "stage 1: tokenizer"

    def __init__(self, cfg: TokenizerTrainConfig, out_dir: str | Path | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir or cfg.train.out_dir)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.accelerator = _accelerator(cfg, self.out_dir)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        sync = should_sync_codebook()  # after the process group exists (quantizer.py: Distributed)
        model, language = build_tokenizer(cfg, sync)
        self.language_codebook = language.embeddings.to(self.accelerator.device)
        self.loss_fn = VQGANLoss(cfg.loss).to(self.accelerator.device)
        o = cfg.optim
        opt_g = adamw_decaying_matrices(model.parameters(), o.lr, o.betas, o.weight_decay)
        opt_d = adamw_decaying_matrices(self.loss_fn.discriminator.parameters(), o.disc_lr, o.betas, 0.0)
        steps = cfg.train.steps
        self.sched_g, self.sched_d = _lr_scheduler(opt_g, o, steps), _lr_scheduler(opt_d, o, steps)
        self.model, self.disc, self.opt_g, self.opt_d = self.accelerator.prepare(
            model, self.loss_fn.discriminator, opt_g, opt_d
        )
        self.schedule = BlendSchedule(cfg.codebook.blend)
        self.step = 0
        self.position = DataPosition()
        q = self.tokenizer.quantizer
        self.usage = UsageWindow(q.num_codes, self.tokenizer.code_shape[2], cfg.train.usage_window)
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", keep_last=cfg.train.keep_checkpoints)
        self.files = RunFiles(self.out_dir, self.accelerator, cfg)
        self._batches: EpochBatches | None = None
        self._reader_skips: dict[str, Any] = {}  # reader skip counts of a resumed run, until the stream exists

    # ----- pieces ---------------------------------------------------------------------------

    @property
    def tokenizer(self) -> VisualTokenizer:
        return self.accelerator.unwrap_model(self.model)

    def relative_distance(self) -> float | None:
        if self.cfg.codebook.mode == "separate":
            return None  # its own codebook has other rows than C_L
        return self.tokenizer.quantizer.relative_distance(self.language_codebook)

    def _dataset(self, split: str, shuffle: bool) -> StreamingDataset:
        """The training split (shuffle=True) with the configured image policy, whose random crops and flips
        follow the run seed and the epoch (`EpochBatches` sets it); eval splits with its `for_eval()`."""
        state = self.accelerator.state
        policy = self.cfg.data.image if shuffle else self.cfg.data.image.for_eval()
        check_fixed_size(policy, read_manifest(self.cfg.data.shards).image_size(), self.cfg.model.image_size)
        return StreamingDataset(
            self.cfg.data.shards,
            split,
            shuffle=shuffle,
            seed=self.cfg.train.seed,
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            rank=state.process_index,
            world_size=state.num_processes,
            image_format="tensor",
            image_size=self.cfg.model.image_size,
            image_policy=policy,
        )

    def batches(self) -> EpochBatches:
        if self._batches is None:
            self._batches = EpochBatches(
                self._dataset(self.cfg.data.train_split, shuffle=True),
                self.cfg.data.batch_size,
                num_workers=self.cfg.data.num_workers,
                max_skip_fraction=self.cfg.data.max_skip_fraction,
                position=self.position,
            )
            self._batches.report.load_state_dict(self._reader_skips)
            self._iter = iter(self._batches)
        return self._batches

    def next_batch(self) -> torch.Tensor:
        self.batches()
        batch = next(self._iter)
        self.position = self._batches.position
        return batch["image"].to(self.accelerator.device)

    # ----- one optimisation step ---------------------------------------------------------------

    def train_step(self, images: torch.Tensor) -> dict[str, Any]:
        """One generator + discriminator step, then the blend. Returns the step's logs."""
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        fixed = self.schedule.codebook_fixed(self.step)
        if self.cfg.codebook.freeze_stats_when_fixed:
            self.tokenizer.quantizer.freeze_norm_stats(fixed)
        with acc.autocast():
            out = self.model(images, freeze_codebook=True if fixed else None)
        # The generator's GAN term goes through the unwrapped discriminator, so DDP never waits for
        # discriminator gradients that this backward does not produce.
        disc = acc.unwrap_model(self.disc)
        self.loss_fn.discriminator = disc
        g_loss, logs = self.loss_fn.generator_loss(
            images,
            out.reconstruction,
            out.commit_loss,
            self.step,
            last_layer=self.tokenizer.decoder.last_layer_weight,
            gan_scale=self.schedule.gan_scale(self.step),
        )
        self.opt_g.zero_grad(set_to_none=True)
        acc.backward(g_loss)
        if cfg.optim.grad_clip > 0:
            logs["grad_norm"] = float(acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip))
        self.opt_g.step()
        self.sched_g.step()
        if self.loss_fn.gan_active(self.step):
            self.loss_fn.discriminator = self.disc  # the DDP-wrapped one: its gradients are all-reduced
            d_loss, d_logs = self.loss_fn.discriminator_loss(images, out.reconstruction.detach(), self.step)
            self.opt_d.zero_grad(set_to_none=True)
            acc.backward(d_loss)
            self.opt_d.step()
            self.sched_d.step()
            logs.update(d_logs)
        self.step += 1
        lam = self.schedule.apply(self.step, self.tokenizer.quantizer, self.language_codebook)
        self.usage.add(out.codes.detach())
        logs.update(
            step=self.step,
            psnr=float(psnr(images, out.reconstruction.detach()).mean()),
            usage=self.usage.unique_per_depth(),
            lr=self.sched_g.get_last_lr()[0],
            gan_scale=self.schedule.gan_scale(self.step - 1),
            codebook_fixed=fixed,
        )
        if lam is not None:
            logs["lam"] = lam
        return logs

    # ----- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, grid_path: Path | None = None) -> dict[str, float]:
        """Mean PSNR per eval split over `eval_batches` batches (codebook frozen, eval mode)."""
        model = self.tokenizer
        was_training = model.training
        model.eval()
        results: dict[str, float] = {}
        try:
            for split in self.cfg.data.eval_splits:
                values, first = [], None
                loader = torch.utils.data.DataLoader(
                    self._dataset(split, shuffle=False),
                    batch_size=self.cfg.data.batch_size,
                    collate_fn=collate,
                )
                for i, batch in enumerate(loader):
                    if i >= self.cfg.train.eval_batches:
                        break
                    if not batch["key"]:
                        continue
                    x = batch["image"].to(self.accelerator.device)
                    rec = model(x, freeze_codebook=True).reconstruction.clamp(-1, 1)
                    values.append(psnr(x, rec))
                    if first is None:
                        first = (x[:8], rec[:8])
                if values:
                    results[f"psnr_{split}"] = float(torch.cat(values).mean())
                if grid_path is not None and first is not None and split == self.cfg.data.eval_splits[0]:
                    x, rec = first
                    grid = make_grid(torch.cat([x, rec]).add(1).div(2).clamp(0, 1), nrow=x.shape[0], padding=1)
                    grid_path.parent.mkdir(parents=True, exist_ok=True)
                    save_image(grid, grid_path)
        finally:
            model.train(was_training)
        return results

    # ----- checkpoints ----------------------------------------------------------------------------

    def checkpoint_contents(self) -> CheckpointContents | None:
        """The main process's: both models, both optimizers and schedules, the data position and the skips."""
        if not self.accelerator.is_main_process:
            return None
        opt_tree, opt_tensors = split_tensors({"g": self.opt_g.state_dict(), "d": self.opt_d.state_dict()}, "optimizer")
        state = {
            "optimizer": opt_tree,
            "scheduler": {"g": self.sched_g.state_dict(), "d": self.sched_d.state_dict()},
            "data": self.position.to_dict(),
            "reader_skips": self.reader_skips_state(),
        }
        tensors = {
            "model": self.tokenizer.state_dict(),
            "discriminator": self.accelerator.unwrap_model(self.disc).state_dict(),
            "optimizer": opt_tensors,
            "usage": self.usage.state_dict(),  # the logged usage of a resumed run then equals the uninterrupted one
        }
        return CheckpointContents(tensors, state)

    def checkpoint_layout(self) -> CheckpointLayout:
        """What a step folder of this run holds: resuming checks it whole and falls back past a damaged one."""
        return CheckpointLayout(
            tensors={
                "model": tensor_shapes(self.tokenizer.state_dict()),
                "discriminator": tensor_shapes(self.accelerator.unwrap_model(self.disc).state_dict()),
                "optimizer": None,
                "usage": None,
            },
            state=("optimizer", "scheduler", "data", "rng"),
            optional=("usage",),  # older checkpoints
        )

    def load_state(self, ckpt: Checkpoint) -> None:
        self.tokenizer.load_state_dict(ckpt.tensors["model"])
        self.accelerator.unwrap_model(self.disc).load_state_dict(ckpt.tensors["discriminator"])
        optim = join_tensors(ckpt.state["optimizer"], ckpt.tensors.get("optimizer", {}))
        self.opt_g.load_state_dict(optim["g"])
        self.opt_d.load_state_dict(optim["d"])
        self.sched_g.load_state_dict(ckpt.state["scheduler"]["g"])
        self.sched_d.load_state_dict(ckpt.state["scheduler"]["d"])
        if "usage" in ckpt.tensors:
            self.usage.load_state_dict(ckpt.tensors["usage"])
        else:
            log.warning("checkpoint %s has no usage window (older format): usage restarts counting", ckpt.path)
        self.position = DataPosition(**ckpt.state["data"])
        self._reader_skips = ckpt.state.get("reader_skips", {})
        self._batches = None

    def reader_skips_state(self) -> dict[str, Any]:
        """What the shard reader skipped so far (corrupt images, broken shards), as checkpoint JSON."""
        return self._batches.report.state_dict() if self._batches is not None else dict(self._reader_skips)

    def reader_summary(self) -> str:
        """One line, e.g. "skipped 10 of 40 samples (25.00%): 10 corrupt image"."""
        return SkipReport.from_state(self.reader_skips_state()).summary()

    # ----- the run (runtime/training_loop.py's hooks) ----------------------------------------------------------

    def prepare_run(self, resume: bool | str) -> None:
        cfg = self.cfg
        if resume:
            self.load_checkpoint(None if resume is True else resume)
        d = cfg.data  # every split it reads must exist before step 1
        check_splits(d.shards, {"data.train_split": [d.train_split], "data.eval_splits": d.eval_splits})
        check_fixed_size(d.image, read_manifest(d.shards).image_size(), cfg.model.image_size)  # not a skip per sample
        self.last_eval: dict[str, float] = {}

    def run_step(self) -> dict[str, Any]:
        logs = self.train_step(self.next_batch())
        if not math.isfinite(logs["total"]):
            self.save_checkpoint()
            check_loss(logs["total"], self.step)
        return logs

    def record(self, logs: dict[str, Any], *, log_step: bool, eval_step: bool) -> None:
        step = self.step
        if log_step:
            logs["rel_distance"] = self.relative_distance()
            logs["seconds"] = round(time.perf_counter() - self.started, 2)
            self.files.log(logs)
        if eval_step:
            grid = self.out_dir / "samples" / f"recon-{step:07d}.png"
            self.last_eval = self.evaluate(grid)
            self.files.log({"step": step, **self.last_eval})
            self.files.log_image("reconstructions", grid, step)

    def progress_stats(self, logs: dict[str, Any]) -> str:
        dist = logs.get("rel_distance")
        stats = f"loss {logs['total']:.4f} psnr {logs['psnr']:.1f} usage {logs['usage']}"
        return stats + (f" dist {dist:.3g}" if dist is not None else "")

    def finish(self) -> TokenizerTrainResult:
        cfg, acc = self.cfg, self.accelerator
        # The whole run's skips, however short it was (after the checkpoint: a run stopped here resumes).
        SkipReport.from_state(
            self.reader_skips_state(), cfg.data.max_skip_fraction, setting="data.max_skip_fraction"
        ).check()
        final_dir = self.save_final()
        metrics = {"step": self.step, "rel_distance": self.relative_distance(), **self.last_eval}
        metrics["usage"] = self.usage.unique_per_depth()
        metrics["seconds"] = round(time.perf_counter() - self.started, 1)
        metrics["data"] = self.reader_summary()
        self.files.write_final_metrics(metrics)
        if acc.is_main_process:
            self.plot()
        self.files.finish("tokenizer", final_dir)  # the model card and the trackers' end
        log.info("stage 1 data: %s", metrics["data"])
        return TokenizerTrainResult(final_dir, self.step, metrics)

    def plot(self) -> Path | None:
        return self.files.plot(
            {
                "loss": ["total", "pixel", "lpips", "quant"],
                "PSNR (dB)": ["psnr", *[f"psnr_{s}" for s in self.cfg.data.eval_splits]],
                "unique codes per depth (window)": ["usage"],
                "||C - C_L|| / ||C_L||": ["rel_distance"],
            },
            log_scale=("loss",),
        )

    def save_final(self) -> Path:
        """`save_pretrained` into out_dir/final via a temporary folder (never a half-written model)."""
        return self.files.save_final(self.tokenizer.save_pretrained)


def train_tokenizer(
    cfg: TokenizerTrainConfig,
    out_dir: str | Path | None = None,
    resume: bool | str = False,
    allow_changed: Sequence[str] = (),
) -> TokenizerTrainResult:
    """Run stage 1 to `cfg.train.steps` (or `train.max_minutes`); returns where the tokenizer was saved. What it
    refuses: `run_stage` (runtime/training_loop.py)."""
    return run_stage(TokenizerTrainer, cfg, out_dir, resume, allow_changed)
