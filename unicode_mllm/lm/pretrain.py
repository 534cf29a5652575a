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

Resume is exact: the checkpoint holds everything the next step depends on (weights, AdamW moments,
schedule position, RNG, and the data position as (epoch, windows consumed); each epoch's window order
is a pure function of (seed, epoch)), so a resumed run logs the same losses as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from unicode_mllm.config import config_to_dict, dump_config
from unicode_mllm.errors import UserError
from unicode_mllm.lm.config import LMModelConfig, LMOptimConfig, LMTrainConfig
from unicode_mllm.lm.corpus import build_corpus, encode_corpus
from unicode_mllm.lm.text_tokenizer import check_text_tokenizer, train_text_tokenizer
from unicode_mllm.runtime.accelerator import configure_deepspeed, is_deepspeed, is_fsdp, stage_accelerator
from unicode_mllm.runtime.checkpoint import (
    CheckpointLayout,
    CheckpointManager,
    atomic_write_json,
    atomic_write_text,
    join_tensors,
    load_shard,
    replace_dir,
    split_tensors,
    tensor_shapes,
    write_errors_as_user_errors,
)
from unicode_mllm.runtime.devices import accelerate_precision, select_device
from unicode_mllm.runtime.lr_schedule import WarmupCosine
from unicode_mllm.runtime.model_card import write_model_card
from unicode_mllm.runtime.progress import make_progress
from unicode_mllm.runtime.run_files import StopOnInterrupt, start_run
from unicode_mllm.runtime.run_lock import RunLock
from unicode_mllm.runtime.seeding import capture_rng_state, restore_rng_state, seed_everything
from unicode_mllm.runtime.sharded import (
    check_zero_launch,
    gather_optimizer_state,
    gather_tensors,
    load_full_optimizer_state,
    load_zero_partition_state,
    zero_launch,
    zero_partition_state,
)
from unicode_mllm.runtime.trackers import accelerator_kwargs, end_trackers, log_row, start_trackers
from unicode_mllm.viz import plot_curves

log = logging.getLogger(__name__)

MODEL_DIRNAME = "model"
TEXT_TOKENIZER_DIRNAME = "text_tokenizer"
CHECKPOINT_DIRNAME = "checkpoints"
LOG_FILENAME = "log.jsonl"
CURVE_FILENAME = "loss_curve.png"
METRICS_FILENAME = "metrics.json"
CONFIG_FILENAME = "lm_config.yaml"


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


@dataclass
class DataPosition:
    """Where the packed stream stands: the epoch and how many of its windows were consumed."""

    epoch: int = 0
    index: int = 0


class PackedWindows:
    """A token stream cut into (seq_len + 1)-token windows, served in a seeded order that changes per epoch.

    Epoch e starts the windows at an offset in [0, seq_len) and shuffles them, both drawn from
    (seed, e) alone, so a `DataPosition` is all a resumed run needs. Consecutive windows share one
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
        epoch, index = position.epoch, position.index
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


def _logged_rows(path: Path, step: int) -> list[dict[str, Any]]:
    """The log's rows up to `step`; a line cut by a crash or a full disk is dropped, not fatal to the resume."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if isinstance(row, dict) and row.get("step", 0) <= step:
                rows.append(row)
    return rows


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _save_final(
    model: LlamaForCausalLM, text_tokenizer: PreTrainedTokenizerBase, cfg: LMTrainConfig, final: Path
) -> None:
    """Write the `save_pretrained` folder beside `final`, then swap it into place (never half a folder)."""
    tmp = final.with_name(f".{final.name}.tmp")
    with write_errors_as_user_errors(f"the final model {final}", "free space and rerun with --resume"):
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        text_tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / CONFIG_FILENAME, dump_config(cfg))
        replace_dir(tmp, final)


def train_lm(
    cfg: LMTrainConfig, out_dir: str | Path | None = None, resume: bool = False, allow_changed: Sequence[str] = ()
) -> Path:
    """Run stage 0 into `out_dir` (default `cfg.train.out_dir`); return the `save_pretrained` folder.

    With `resume`, continue from the latest usable checkpoint in `out_dir/checkpoints`. Raises UserError
    when another run is writing `out_dir` (the run lock), when `resume` is true and there is none, when
    `out_dir` already holds checkpoints or a model and `resume` is false, when a resumed config differs from
    the run's lm_config.yaml in other keys than `allow_changed` and those safe to change
    (run_files.RESUME_MAY_CHANGE), or when the corpus is too small for one batch or one held-out window.
    """
    out_dir = Path(out_dir) if out_dir is not None else Path(cfg.train.out_dir)
    with RunLock(out_dir):  # the main process's, for the whole run
        return _train_lm(cfg, out_dir, resume, allow_changed)


def _train_lm(cfg: LMTrainConfig, out_dir: Path, resume: bool, allow_changed: Sequence[str]) -> Path:
    cfg = replace(cfg, train=replace(cfg.train, out_dir=out_dir))  # the resolved config names where it went
    tcfg = cfg.train
    device = select_device(tcfg.device)
    accelerator = stage_accelerator(
        "train-lm",
        fsdp=True,  # checkpoints and the final model gathered to full tensors (runtime/sharded.py)
        deepspeed=True,  # the same, the optimizer's state kept in ZeRO's partitions
        cpu=device.type == "cpu",
        mixed_precision=accelerate_precision(tcfg.mixed_precision, device),
        **accelerator_kwargs(tcfg, out_dir),  # train.log_with's tracker (runtime/trackers.py)
    )
    is_main = accelerator.is_main_process
    zero = is_deepspeed(accelerator)

    # The same refusals, config check and clean-up as stages 1 and 2.
    start_run(
        out_dir, resume, cfg, allow_changed, is_main=is_main, config_name=CONFIG_FILENAME, final_dirname=MODEL_DIRNAME
    )
    manager = CheckpointManager(out_dir / CHECKPOINT_DIRNAME, keep_last=tcfg.keep_last)
    start_trackers(accelerator, cfg)

    started = time.perf_counter()
    train_docs = build_corpus(cfg.corpus, "train", show_progress=is_main)
    val_docs = build_corpus(cfg.corpus, "val")
    tokenizer_dir = out_dir / TEXT_TOKENIZER_DIRNAME
    if resume:
        text_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        check_text_tokenizer(text_tokenizer)
    else:
        text_tokenizer = train_text_tokenizer(train_docs, cfg.text_tokenizer)
        if is_main:
            text_tokenizer.save_pretrained(tokenizer_dir)
    if is_main:  # on resume too: the settings a resume was allowed to change are the run's from now on
        atomic_write_text(out_dir / CONFIG_FILENAME, dump_config(cfg))
    # Word splits only in the training stream: held-out loss is measured on the canonical encoding.
    train_ids = encode_corpus(train_docs, text_tokenizer, cfg.corpus.split_word_rate, seed=tcfg.seed)
    val_ids = encode_corpus(val_docs, text_tokenizer)
    seen_ids = int((torch.bincount(train_ids, minlength=len(text_tokenizer)) > 0).sum())
    log.info(
        "corpus: %d train / %d held-out tokens; text tokenizer: %d tokens, %d of them occur in the training text",
        train_ids.numel(),
        val_ids.numel(),
        len(text_tokenizer),
        seen_ids,
    )
    data = PackedWindows(train_ids, tcfg.seq_len, tcfg.seed)
    held_out = eval_windows(val_ids, tcfg.seq_len)

    seed_everything(tcfg.seed)
    model = build_model(cfg.model, text_tokenizer)
    num_parameters = sum(p.numel() for p in model.parameters())
    checkpoint = None
    if resume:  # checked whole against this model; a damaged newest checkpoint falls back to an older one
        layout = CheckpointLayout(
            tensors={"model": tensor_shapes(model.state_dict())} | ({} if zero else {"optimizer": None}),
            state=("optimizer", "scheduler", "rng", "data", "elapsed_s"),
        )
        checkpoint = manager.load(layout=layout)
        log.info("resuming %s from %s", out_dir, checkpoint.path.name)
        model.load_state_dict(checkpoint.tensors["model"])
    optimizer = build_optimizer(model, cfg.optim)
    # The scheduler stays out of `prepare`: accelerate steps a prepared scheduler once per process, and
    # ours counts optimizer steps.
    scheduler = build_scheduler(optimizer, cfg.optim, tcfg.steps)
    if zero:  # the engine steps, clips and accumulates (configure_deepspeed)
        configure_deepspeed(accelerator, stage="train-lm", grad_clip=cfg.optim.grad_clip)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    sharded = is_fsdp(accelerator) or zero

    step, position, elapsed_before = 0, DataPosition(), 0.0
    log_path = out_dir / LOG_FILENAME
    if checkpoint is not None:
        state = checkpoint.state
        # After prepare, so torch moves the AdamW moments onto the parameters' device.
        if zero:  # the weights were loaded before `prepare`; the optimizer is this rank's ZeRO partitions
            saved = state["optimizer"]
            check_zero_launch(saved.get("zero") if isinstance(saved, dict) else None, accelerator, checkpoint.path)
            local = load_shard(checkpoint.path, "optimizer", accelerator.process_index)
            load_zero_partition_state(optimizer.optimizer, join_tensors(saved["partitions"], local))
        else:
            load_full_optimizer_state(optimizer, join_tensors(state["optimizer"], checkpoint.tensors["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        position = DataPosition(**state["data"])
        step, elapsed_before = checkpoint.step, float(state["elapsed_s"])
        restore_rng_state(state["rng"])
        rows = _logged_rows(log_path, step)  # drop what the lost run logged after
    else:
        rows = []
    if is_main:
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in rows))

    global_batch = tcfg.batch_size * accelerator.num_processes
    rank_slice = slice(accelerator.process_index * tcfg.batch_size, (accelerator.process_index + 1) * tcfg.batch_size)
    grad_clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf  # inf: measure, never clip
    # The running window of the logged loss: resumed from the checkpoint, so the first row after a resume still
    # averages every step since the last row, not only those since the resume.
    losses: list[float] = list(checkpoint.state.get("loss_window", [])) if checkpoint is not None else []
    last_train_loss = next((r["train/loss"] for r in reversed(rows) if "train/loss" in r), None)
    val_loss = next((r["val/loss"] for r in reversed(rows) if "val/loss" in r), None)
    loop_started = time.perf_counter()

    model.train()
    with make_progress(disable=not is_main) as progress, StopOnInterrupt(accelerator) as interrupt:
        task = progress.add_task("stage 0: LM", total=tcfg.steps, completed=step, stats="")
        while step < tcfg.steps:
            if interrupt.requested:  # single process only (StopOnInterrupt): this is the main process
                elapsed = elapsed_before + time.perf_counter() - started
                saved = _save_checkpoint(
                    manager, step, raw_model, optimizer, scheduler, position, cfg, elapsed, losses, main=True
                )
                interrupt.stop(step, saved)
            windows, position = data.next_batch(position, global_batch)
            loss = lm_loss(model, windows[rank_slice].to(accelerator.device))
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(accelerator.reduce(loss.detach(), "mean")))

            row: dict[str, Any] = {}
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                last_train_loss = sum(losses) / len(losses)
                row.update({"train/loss": last_train_loss, "train/lr": lr, "train/grad_norm": float(grad_norm)})
                losses.clear()
            if step % tcfg.eval_every == 0 or step == tcfg.steps:
                with accelerator.autocast():
                    val_loss = evaluate(raw_model, held_out, tcfg.batch_size, tcfg.eval_batches)
                row.update({"val/loss": val_loss, "val/ppl": math.exp(val_loss)})
            if row:
                row = {"step": step, **row, "tokens": step * global_batch * tcfg.seq_len}
                row["elapsed_s"] = round(elapsed_before + time.perf_counter() - started, 3)
                if is_main:
                    _append_jsonl(log_path, row)
                log_row(accelerator, row)  # the tracker's curves at metrics.jsonl's steps
                rows.append(row)
            if step % tcfg.ckpt_every == 0 or step == tcfg.steps:
                elapsed = elapsed_before + time.perf_counter() - started
                if is_main or sharded:  # under FSDP/DeepSpeed every rank takes part in gathering the full tensors
                    _save_checkpoint(
                        manager,
                        step,
                        raw_model,
                        optimizer,
                        scheduler,
                        position,
                        cfg,
                        elapsed,
                        losses,
                        main=is_main,
                        zero=zero_launch(accelerator) if zero else None,
                    )
                accelerator.wait_for_everyone()
            progress.update(task, completed=step, stats=f"loss {last_train_loss or float('nan'):.3f} lr {lr:.1e}")

    steps_run = step - (checkpoint.step if checkpoint is not None else 0)
    final = out_dir / MODEL_DIRNAME
    full = accelerator.get_state_dict(model) if sharded else None  # FSDP: a collective, the whole model on rank 0
    if is_main:
        if full is not None:  # saved from a whole copy rebuilt on the main process
            with torch.random.fork_rng():
                raw_model = build_model(cfg.model, text_tokenizer)
            raw_model.load_state_dict(full)
        _save_final(raw_model, text_tokenizer, cfg, final)
        plot_curves(
            rows,
            {"next-token loss (nats)": ["train/loss", "val/loss"]},
            out_dir / CURVE_FILENAME,
            log_scale=("next-token loss (nats)",),
        )
        loop_seconds = time.perf_counter() - loop_started
        metrics = {
            "steps": tcfg.steps,
            "seconds": round(elapsed_before + time.perf_counter() - started, 1),
            "seconds_per_step_this_run": round(loop_seconds / steps_run, 4) if steps_run else None,
            "train_loss": last_train_loss,
            "val_loss": val_loss,
            "val_ppl": math.exp(val_loss) if val_loss is not None else None,
            "num_parameters": num_parameters,
            "vocab_size": len(text_tokenizer),
            "vocab_tokens_in_corpus": seen_ids,
            "corpus_tokens": {"train": train_ids.numel(), "val": val_ids.numel()},
            "tokens_seen": tcfg.steps * global_batch * tcfg.seq_len,
            "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision,
            "model_dir": str(final),
        }
        atomic_write_json(out_dir / METRICS_FILENAME, metrics)
        write_model_card(final, "lm", cfg, out_dir / METRICS_FILENAME, data_section="corpus")
        log.info("stage 0: held-out loss %.4f (ppl %.3f); model in %s", val_loss, math.exp(val_loss), final)
    end_trackers(accelerator)
    accelerator.wait_for_everyone()
    return final


def _save_checkpoint(
    manager: CheckpointManager,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    position: DataPosition,
    cfg: LMTrainConfig,
    elapsed_s: float,
    loss_window: list[float] | None = None,
    main: bool = True,
    zero: dict[str, int] | None = None,
) -> Path | None:
    """On the main process; under FSDP on every rank (the full tensors are gathered to the main process, which
    alone writes: None elsewhere). The same files whoever wrote them. Under DeepSpeed (`zero`: its launch,
    `zero_launch`) on every rank too: the full fp32 weights, and each rank's own ZeRO partitions of the optimizer
    in optimizer.rank{R}.safetensors of the same atomic folder."""
    run_state = {
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "data": asdict(position),
        "config": config_to_dict(cfg),
        "elapsed_s": elapsed_s,
        "loss_window": list(loss_window or []),  # losses since the last logged row
    }
    if zero is not None:  # keep_vars: the parameters themselves, whose ZeRO attributes say how to gather them
        model_state = gather_tensors(model.state_dict(keep_vars=True).items(), main)
        optimizer_tree, local = split_tensors(zero_partition_state(optimizer.optimizer), "zero")
        state = {"optimizer": {"zero": zero, "partitions": optimizer_tree}, **run_state}
        path = manager.save_collective(step, {"model": model_state}, state, "optimizer", local)
        return path if main else None
    model_state = gather_tensors(model.state_dict().items(), main)
    optimizer_state = gather_optimizer_state(optimizer, main)
    if not main:
        return None
    optimizer_tree, optimizer_tensors = split_tensors(optimizer_state)
    state = {"optimizer": optimizer_tree, **run_state}
    return manager.save(step, {"model": model_state, "optimizer": optimizer_tensors}, state)
