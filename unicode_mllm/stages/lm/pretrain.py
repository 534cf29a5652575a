"""Stage 0: pre-train the embedded tiny LLaMA on the shapes world's text, so its embeddings carry structure.

No pretrained LM can be downloaded, so the tiny preset makes its own: `train_lm` builds the corpus
(corpus.py), trains the byte-level BPE text tokenizer (text_tokenizer.py), pre-trains a
`LlamaForCausalLM` on packed next-token windows, and saves both with `save_pretrained` so later stages
load them exactly like a real LLM:

    path = train_lm(load_config(LMTrainConfig, "configs/lm/tiny.yaml"))
    model = AutoModelForCausalLM.from_pretrained(path)
    text_tokenizer = AutoTokenizer.from_pretrained(path)

Run folder (`train.out_dir`):

    text_tokenizer/        the tokenizer, written before step 1 and reused on resume
    checkpoints/step-N/    model, optimizer (safetensors) + scheduler, RNG, data position, config (JSON)
    log.jsonl              one line per log/eval step, keys `train/loss`, `val/loss`, ...
    loss_curve.png         train and held-out loss
    metrics.json           final figures (held-out loss and perplexity, time, sizes)
    lm_config.yaml         the resolved config
    model/                 the final `save_pretrained` folder (model + text tokenizer + lm_config.yaml)

The run is a `TrainingStage` of the shared loop (runtime/training_loop.py), as stages 1 and 2 are. Resume is
exact: the checkpoint holds everything the next step depends on (weights, AdamW moments, schedule position, RNG,
and the data position as (epoch, windows consumed); each epoch's window order is a pure function of (seed,
epoch)), so a resumed run logs the same losses as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from unicode_mllm.config import config_to_dict
from unicode_mllm.data.batches import DataPosition
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.accelerator import configure_deepspeed, is_deepspeed, is_fsdp, stage_accelerator
from unicode_mllm.runtime.checkpoint import (
    Checkpoint,
    CheckpointLayout,
    CheckpointManager,
    atomic_write_json,
    tensor_shapes,
)
from unicode_mllm.runtime.devices import accelerate_precision, select_device
from unicode_mllm.runtime.lr_schedule import WarmupCosine
from unicode_mllm.runtime.run_files import CHECKPOINTS_DIRNAME, RunFileNames, RunFiles
from unicode_mllm.runtime.seeding import seed_everything
from unicode_mllm.runtime.trackers import accelerator_kwargs
from unicode_mllm.runtime.training_loop import (
    CheckpointContents,
    TrainingStage,
    load_optimizer,
    model_and_optimizer,
    run_stage,
)
from unicode_mllm.stages.lm.config import LMModelConfig, LMOptimConfig, LMTrainConfig
from unicode_mllm.stages.lm.corpus import build_corpus, encode_corpus
from unicode_mllm.stages.lm.text_tokenizer import check_text_tokenizer, train_text_tokenizer

log = logging.getLogger(__name__)

TEXT_TOKENIZER_DIRNAME = "text_tokenizer"
# The other files of the run folder (the list above): its config, metrics log, curves, final metrics, final model
# folder and the config in that folder.
FILE_NAMES = RunFileNames("lm_config.yaml", "log.jsonl", "loss_curve.png", "metrics.json", "model", "lm_config.yaml")


# ------------------------------------------------------------------------------------------ model


def build_model(cfg: LMModelConfig, text_tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A freshly initialised fp32 `LlamaForCausalLM` whose vocabulary is exactly `len(text_tokenizer)`.

    Library defaults that change behaviour (activation, biases, dropout, RoPE type) are passed
    explicitly, so a transformers upgrade cannot silently change the architecture.
    """
    config = LlamaConfig(
        vocab_size=len(text_tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=text_tokenizer.bos_token_id,
        eos_token_id=text_tokenizer.eos_token_id,
        pad_token_id=text_tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def lm_loss(model: torch.nn.Module, windows: Tensor) -> Tensor:
    """Mean next-token cross-entropy of `windows` (b, t+1) int64 token ids; fp32 scalar.

    The model reads windows[:, :-1] and predicts windows[:, 1:]; the loss is taken on fp32 logits.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (batch, seq_len + 1) with seq_len >= 1, got {tuple(windows.shape)}")
    logits = model(input_ids=windows[:, :-1], use_cache=False).logits  # (b, t, v)
    return F.cross_entropy(rearrange(logits.float(), "b t v -> (b t) v"), rearrange(windows[:, 1:], "b t -> (b t)"))


# ------------------------------------------------------------------------------------------ optim


def build_optimizer(model: torch.nn.Module, cfg: LMOptimConfig) -> torch.optim.AdamW:
    """AdamW with two parameter groups, named 'decay' and 'no_decay' (nanoGPT's grouping by rank).

    Weight decay applies to rank >= 2 weights (attention and MLP projections, the output head). Norm
    gains (rank 1; LLaMA has no biases) never decay: shrinking them only rescales activations. The
    input embedding decays only when `cfg.decay_embeddings`: it becomes the visual codebook C_L, and
    decoupled decay shrinks a row on every step while only tokens that occur push it back, so row
    norms would end up encoding token frequency (and never-seen byte tokens would shrink towards zero)
    instead of staying at a common scale.
    """
    embedding = model.get_input_embeddings().weight
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters are listed once
        if not p.requires_grad:
            continue
        is_embedding = p is embedding
        if p.ndim >= 2 and (cfg.decay_embeddings or not is_embedding):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: LMOptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + cosine schedule, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio))


# ------------------------------------------------------------------------------------------- data


class PackedWindows:
    """A token stream cut into (seq_len + 1)-token windows, served in a seeded order that changes per epoch.

    Epoch e starts the windows at an offset in [0, seq_len) and shuffles them, both drawn from
    (seed, e) alone, so a `DataPosition` is all a resumed run needs (its `batch` counts windows here, so a
    resume under another number of processes continues at the same window). Consecutive windows share one
    token, so every token of the stream is a target once per epoch. A batch never straddles two epochs:
    the windows left over at an epoch's end are skipped.

    Stage 0 is packed already: every window is full text (padded/real tokens = 1.00), so stage 2's packing
    (data/packing.py) has no padding to remove here. A window spans document boundaries (`</s><s>` between
    documents) and attends across them, the usual convention of LM pre-training; restarting positions at each
    `<s>` would mask that too, but it would change what stage 0 learns for no gain in throughput.
    """

    def __init__(self, token_ids: Tensor, seq_len: int, seed: int):
        self.token_ids = token_ids
        self.seq_len = seq_len
        self.seed = seed
        self._cached: tuple[int, int, Tensor] | None = None

    def _order(self, epoch: int) -> tuple[int, Tensor]:
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            offset = int(rng.integers(self.seq_len))
            count = (self.token_ids.numel() - 1 - offset) // self.seq_len
            self._cached = (epoch, offset, torch.from_numpy(rng.permutation(max(count, 0))))
        return self._cached[1], self._cached[2]

    def next_batch(self, position: DataPosition, batch_size: int) -> tuple[Tensor, DataPosition]:
        """(batch_size, seq_len + 1) int64 windows and the position after them.

        Raises UserError when the stream cannot fill one batch.
        """
        epoch, index = position.epoch, position.batch
        for _ in range(2):
            offset, order = self._order(epoch)
            if index + batch_size <= len(order):
                starts = offset + order[index : index + batch_size] * self.seq_len
                rows = starts[:, None] + torch.arange(self.seq_len + 1)  # (b, t+1)
                return self.token_ids[rows], DataPosition(epoch, index + batch_size)
            epoch, index = epoch + 1, 0
        raise UserError(
            f"the training corpus has {self.token_ids.numel()} tokens, fewer than one batch of {batch_size} "
            f"windows of {self.seq_len + 1}; raise corpus.train_samples or lower train.batch_size / train.seq_len"
        )


def eval_windows(token_ids: Tensor, seq_len: int) -> Tensor:
    """The held-out stream as consecutive (n, seq_len + 1) windows sharing one token, in order."""
    count = (token_ids.numel() - 1) // seq_len
    if count < 1:
        raise UserError(
            f"the held-out corpus has {token_ids.numel()} tokens, fewer than one window of {seq_len + 1}; "
            "raise corpus.val_samples or lower train.seq_len"
        )
    return token_ids[: count * seq_len + 1].unfold(0, seq_len + 1, seq_len)


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: Tensor, batch_size: int, max_batches: int | None = None) -> float:
    """Mean next-token loss (nats per token) over `windows` (n, t+1), in batches of `batch_size`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i, start in enumerate(range(0, len(windows), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        batch = windows[start : start + batch_size].to(device)
        total += float(lm_loss(model, batch)) * len(batch)  # every window has seq_len targets
        count += len(batch)
    model.train(was_training)
    return total / count


# ------------------------------------------------------------------------------------------ train


def train_lm(
    cfg: LMTrainConfig, out_dir: str | Path | None = None, resume: bool = False, allow_changed: Sequence[str] = ()
) -> Path:
    """Run stage 0 into `out_dir` (default `cfg.train.out_dir`); return the `save_pretrained` folder.

    With `resume`, continue from the latest usable checkpoint in `out_dir/checkpoints`. Raises UserError for
    what `run_stage` (runtime/training_loop.py) refuses and for a corpus too small for one batch or one held-out
    window.
    """
    return run_stage(LMTrainer, cfg, out_dir, resume, allow_changed)


class LMTrainer(TrainingStage):
    """One stage-0 run: the corpus and text tokenizer, the model and its optimizer, built when the run starts
    (`prepare_run`: a resumed run reuses the run's text tokenizer and loads the weights before `prepare`)."""

    description = "stage 0: LM"
    file_names = FILE_NAMES

    def __init__(self, cfg: LMTrainConfig, out_dir: str | Path | None = None):
        out_dir = Path(out_dir) if out_dir is not None else Path(cfg.train.out_dir)
        self.cfg = replace(cfg, train=replace(cfg.train, out_dir=out_dir))  # the resolved config names where it went
        self.out_dir = out_dir
        tcfg = self.cfg.train
        device = select_device(tcfg.device)
        self.accelerator = stage_accelerator(
            "train-lm",
            fsdp=True,  # checkpoints and the final model gathered to full tensors (runtime/sharded.py)
            deepspeed=True,  # the same, the optimizer's state kept in ZeRO's partitions
            cpu=device.type == "cpu",
            mixed_precision=accelerate_precision(tcfg.mixed_precision, device),
            **accelerator_kwargs(tcfg, out_dir),  # train.log_with's tracker (runtime/trackers.py)
        )
        self.zero = is_deepspeed(self.accelerator)
        self.ckpt = CheckpointManager(out_dir / CHECKPOINTS_DIRNAME, keep_last=tcfg.keep_last)
        self.files = RunFiles(out_dir, self.accelerator, self.cfg, FILE_NAMES)
        self.step = 0
        self.position = DataPosition()
        self.elapsed_before = 0.0  # seconds the run took before this resume
        # The running window of the logged loss: resumed from the checkpoint, so the first row after a resume still
        # averages every step since the last row, not only those since the resume.
        self.losses: list[float] = []
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        self.global_batch = tcfg.batch_size * processes
        self.rank_slice = slice(rank * tcfg.batch_size, (rank + 1) * tcfg.batch_size)

    def elapsed(self) -> float:
        """Seconds of the whole run so far, resumes included."""
        return self.elapsed_before + time.perf_counter() - self.run_started

    # ----- set-up ----------------------------------------------------------------------------------------------

    def prepare_run(self, resume: bool | str) -> None:
        self.run_started = time.perf_counter()
        self._prepare_data(bool(resume))
        seed_everything(self.cfg.train.seed)
        model = build_model(self.cfg.model, self.text_tokenizer)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.raw_model = model
        checkpoint = None
        if resume:  # checked whole against this model; a damaged newest checkpoint falls back to an older one
            checkpoint = self.ckpt.load(layout=self.checkpoint_layout())
            log.info("resuming %s from %s", self.out_dir, checkpoint.path.name)
            model.load_state_dict(checkpoint.tensors["model"])
        optimizer = build_optimizer(model, self.cfg.optim)
        # The scheduler stays out of `prepare`: accelerate steps a prepared scheduler once per process, and
        # ours counts optimizer steps.
        self.scheduler = build_scheduler(optimizer, self.cfg.optim, self.cfg.train.steps)
        if self.zero:  # the engine steps, clips and accumulates (configure_deepspeed)
            configure_deepspeed(self.accelerator, stage="train-lm", grad_clip=self.cfg.optim.grad_clip)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.raw_model = self.accelerator.unwrap_model(self.model)
        if checkpoint is not None:  # after prepare, so torch moves the AdamW moments onto the parameters' device
            self.restore(checkpoint)
        self.start_step = self.step
        self.model.train()

    def _prepare_data(self, resume: bool) -> None:
        """The corpus, the text tokenizer (trained, or the run's own on resume) and the token streams."""
        cfg, is_main = self.cfg, self.accelerator.is_main_process
        train_docs = build_corpus(cfg.corpus, "train", show_progress=is_main)
        val_docs = build_corpus(cfg.corpus, "val")
        tokenizer_dir = self.out_dir / TEXT_TOKENIZER_DIRNAME
        if resume:
            self.text_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            check_text_tokenizer(self.text_tokenizer)
        else:
            self.text_tokenizer = train_text_tokenizer(train_docs, cfg.text_tokenizer)
            if is_main:
                self.text_tokenizer.save_pretrained(tokenizer_dir)
        # Word splits only in the training stream: held-out loss is measured on the canonical encoding.
        train_ids = encode_corpus(train_docs, self.text_tokenizer, cfg.corpus.split_word_rate, seed=cfg.train.seed)
        val_ids = encode_corpus(val_docs, self.text_tokenizer)
        seen_ids = int((torch.bincount(train_ids, minlength=len(self.text_tokenizer)) > 0).sum())
        log.info(
            "corpus: %d train / %d held-out tokens; text tokenizer: %d tokens, %d of them occur in the training text",
            train_ids.numel(),
            val_ids.numel(),
            len(self.text_tokenizer),
            seen_ids,
        )
        self.corpus_figures = {
            "vocab_tokens_in_corpus": seen_ids,
            "corpus_tokens": {"train": train_ids.numel(), "val": val_ids.numel()},
        }
        self.data = PackedWindows(train_ids, cfg.train.seq_len, cfg.train.seed)
        self.held_out = eval_windows(val_ids, cfg.train.seq_len)

    # ----- one step ----------------------------------------------------------------------------------------

    def run_step(self) -> dict[str, Any]:
        acc = self.accelerator
        windows, self.position = self.data.next_batch(self.position, self.global_batch)
        loss = lm_loss(self.model, windows[self.rank_slice].to(acc.device))
        acc.backward(loss)
        grad_clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip is not None else math.inf  # inf: measure
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), grad_clip)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(float(acc.reduce(loss.detach(), "mean")))
        return {"lr": lr, "grad_norm": grad_norm}

    def record(self, logs: dict[str, Any], *, log_step: bool, eval_step: bool) -> None:
        """One row for the step, its train and held-out figures together."""
        tcfg = self.cfg.train
        row: dict[str, Any] = {}
        if log_step:
            train_loss = sum(self.losses) / len(self.losses)
            row.update({"train/loss": train_loss, "train/lr": logs["lr"], "train/grad_norm": float(logs["grad_norm"])})
            self.losses.clear()
        if eval_step:
            with self.accelerator.autocast():
                val_loss = evaluate(self.raw_model, self.held_out, tcfg.batch_size, tcfg.eval_batches)
            row.update({"val/loss": val_loss, "val/ppl": math.exp(val_loss)})
        if row:
            row = {"step": self.step, **row, "tokens": self.step * self.global_batch * tcfg.seq_len}
            row["elapsed_s"] = round(self.elapsed(), 3)
            self.files.log(row)

    def progress_stats(self, logs: dict[str, Any]) -> str:
        loss = self.last_logged("train/loss")  # None before the first logged row
        return f"loss {'-' if loss is None else f'{loss:.3f}'} lr {logs['lr']:.1e}"

    def last_logged(self, key: str) -> float | None:
        """The latest logged value of `key` in this run's log, resumes included (main process; None elsewhere)."""
        return next((row[key] for row in reversed(self.files.rows) if key in row), None)

    # ----- checkpoints -------------------------------------------------------------------------------------

    def checkpoint_contents(self) -> CheckpointContents | None:
        """The model and the optimizer (`model_and_optimizer`: every rank takes part under FSDP and DeepSpeed),
        the schedule, the data position, the config, the run's time and the losses since the last logged row."""
        run_state = {
            "scheduler": self.scheduler.state_dict(),
            "data": self.position.to_dict(),
            "config": config_to_dict(self.cfg),
            "elapsed_s": self.elapsed(),
            "loss_window": list(self.losses),
        }

        def weights() -> Any:  # keep_vars under DeepSpeed: the parameters, whose ZeRO attributes say how to gather
            return self.raw_model.state_dict(keep_vars=self.zero).items()

        return model_and_optimizer(self.accelerator, weights, self.optimizer, "model", run_state)

    def checkpoint_layout(self) -> CheckpointLayout:
        return CheckpointLayout(
            tensors={"model": tensor_shapes(self.raw_model.state_dict())} | ({} if self.zero else {"optimizer": None}),
            state=("optimizer", "scheduler", "rng", "data", "elapsed_s"),
        )

    def load_state(self, checkpoint: Checkpoint) -> None:
        """All but the weights, which `prepare_run` loaded before `prepare`."""
        state = checkpoint.state
        load_optimizer(self.accelerator, self.optimizer, checkpoint)
        self.scheduler.load_state_dict(state["scheduler"])
        data = state["data"]  # {"epoch", "batch"}; stage-0 checkpoints before the shared loop said "index"
        self.position = DataPosition(int(data["epoch"]), int(data["batch"] if "batch" in data else data["index"]))
        self.elapsed_before = float(state["elapsed_s"])
        self.losses = list(state.get("loss_window", []))

    # ----- the end -----------------------------------------------------------------------------------------

    def finish(self) -> Path:
        """The final model (gathered whole under FSDP and DeepSpeed), loss curve, metrics.json and model card."""
        acc, tcfg = self.accelerator, self.cfg.train
        steps_run = self.step - self.start_step
        sharded = is_fsdp(acc) or self.zero
        full = acc.get_state_dict(self.model) if sharded else None  # FSDP: a collective, the whole model on rank 0
        final = self.files.save_final(lambda tmp: self._save_model(tmp, full))
        if acc.is_main_process:
            self.files.plot(
                {"next-token loss (nats)": ["train/loss", "val/loss"]}, log_scale=("next-token loss (nats)",)
            )
            val_loss, loop_seconds = self.last_logged("val/loss"), time.perf_counter() - self.started
            metrics = {
                "steps": tcfg.steps,
                "seconds": round(self.elapsed(), 1),
                "seconds_per_step_this_run": round(loop_seconds / steps_run, 4) if steps_run else None,
                "train_loss": self.last_logged("train/loss"),
                "val_loss": val_loss,
                "val_ppl": math.exp(val_loss) if val_loss is not None else None,
                "num_parameters": self.num_parameters,
                "vocab_size": len(self.text_tokenizer),
                **self.corpus_figures,
                "tokens_seen": tcfg.steps * self.global_batch * tcfg.seq_len,
                "device": str(acc.device),
                "mixed_precision": acc.mixed_precision,
                "model_dir": str(final),
            }
            atomic_write_json(self.files.final_metrics_path, metrics)
            log.info("stage 0: held-out loss %.4f (ppl %.3f); model in %s", val_loss, math.exp(val_loss), final)
        self.files.finish("lm", final, data_section="corpus")  # the model card and the trackers' end
        acc.wait_for_everyone()
        return final

    def _save_model(self, tmp: Path, full: dict[str, Tensor] | None) -> None:
        """The `save_pretrained` folder with the text tokenizer; from a whole copy rebuilt on the main process when
        the model is sharded (`full`: its gathered state dict)."""
        model = self.raw_model
        if full is not None:
            with torch.random.fork_rng():
                model = build_model(self.cfg.model, self.text_tokenizer)
            model.load_state_dict(full)
        model.save_pretrained(tmp)
        self.text_tokenizer.save_pretrained(tmp)
