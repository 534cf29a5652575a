"""The stage-2 loop: one causal LM learns to read images (VQA, captions) and write them (text-to-image,
decompression) with the frozen stage-1 visual tokenizer, through `accelerate`.

    cfg = load_config(MLLMTrainConfig, "configs/mllm/tiny.yaml")
    result = train_mllm(cfg)             # result.final_dir loads with UniCodeMLLM.from_pretrained

Per optimizer step: `grad_accum` sample groups (each the samples of `records_per_batch` records), packed
several to a row with per-sample positions and attention (`data.packing`, data/packing.py) or cut into
forward passes of similar lengths, the next-token loss on assistant turns only (mean over every
labelled token of the step), gradient
clipping, AdamW, warm-up + cosine. Logged per task to metrics.jsonl and curves.png; evaluated
teacher-forced (eval_set.py) every `eval_every` steps. Checkpoints hold the trainable weights (all of
the LM, or the LoRA adapters and the embedding table), the optimizer, the schedule, the data position
and every RNG: resuming gives the same next-step loss (tested).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.optim.lr_scheduler import LambdaLR

from unicode_mllm.constants import IGNORE_INDEX
from unicode_mllm.data.batches import DataPosition
from unicode_mllm.data.mllm_samples import MODEL_INPUTS, MLLMCollator, MLLMSample, MLLMSampleBuilder, SkipCounter
from unicode_mllm.data.packing import (
    PackedCollator,
    Rows,
    packed_chunks,
    packing_problem,
    padded_tokens,
    sample_losses,
)
from unicode_mllm.data.shards import read_manifest
from unicode_mllm.data.stream import SkipReport, StreamingDataset, collate
from unicode_mllm.errors import UserError
from unicode_mllm.model.mllm import LoraSettings, UniCodeMLLM
from unicode_mllm.runtime.accelerator import (
    accumulation,
    configure_deepspeed,
    is_deepspeed,
    is_fsdp,
    stage_accelerator,
)
from unicode_mllm.runtime.checkpoint import (
    Checkpoint,
    CheckpointLayout,
    CheckpointManager,
    join_tensors,
    load_shard,
    split_tensors,
)
from unicode_mllm.runtime.devices import accelerate_precision, select_device
from unicode_mllm.runtime.lr_schedule import WarmupCosine
from unicode_mllm.runtime.optimizer import adamw_decaying_matrices
from unicode_mllm.runtime.progress import make_progress
from unicode_mllm.runtime.run_files import RunFiles, StopOnInterrupt, run_stage
from unicode_mllm.runtime.seeding import capture_rng_state, restore_rng_state, seed_everything
from unicode_mllm.runtime.sharded import (
    check_zero_launch,
    gather_optimizer_state,
    gather_tensors,
    load_full_optimizer_state,
    load_full_parameters,
    load_zero_partition_state,
    shard_like,
    zero_launch,
    zero_partition_state,
    zero_shape,
)
from unicode_mllm.runtime.time_budget import out_of_time
from unicode_mllm.runtime.trackers import accelerator_kwargs
from unicode_mllm.training.config import MLLMTrainConfig
from unicode_mllm.training.eval_set import EvalSample, build_eval_samples, evaluate_teacher_forced, token_losses
from unicode_mllm.training.sample_stream import MLLMBatches, RecordTokenIds, SourceMixture, length_chunks
from unicode_mllm.training.task_mixture import TaskMixture
from unicode_mllm.training.up_front_checks import check_sequence_lengths, check_sources

log = logging.getLogger(__name__)

TRAIN_TASKS = ("vqa", "caption", "text_to_image", "text_to_image_uncond", "decompression")


@dataclass
class MLLMTrainResult:
    final_dir: Path
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)


def _accelerator(cfg: MLLMTrainConfig, out_dir: Path) -> Accelerator:
    device = select_device(cfg.train.device)  # UserError for cuda/mps that is not there
    precision = accelerate_precision(cfg.train.mixed_precision, device)
    # A compressor's weights get no gradient in a pass without images (text-to-image chunks): DDP must expect that.
    unused = DistributedDataParallelKwargs(find_unused_parameters=cfg.model.compressor.name != "identity")
    return stage_accelerator(
        "train-mllm",
        fsdp=True,
        deepspeed=True,
        cpu=device.type == "cpu",
        mixed_precision=precision,
        kwargs_handlers=[unused],
        **accelerator_kwargs(cfg.train, out_dir),  # train.log_with's tracker (runtime/trackers.py)
    )


def prepare_fsdp(accelerator: Accelerator, model: UniCodeMLLM) -> None:
    """Before `prepare` under FSDP: the frozen visual tokenizer stays whole on every rank (it encodes images
    outside the model's forward), and a transformer-based wrap shards the LM's decoder layers by the LM's own
    `_no_split_modules` unless the accelerate config names the classes."""
    plugin = accelerator.state.fsdp_plugin
    plugin.ignored_modules = [model.visual_tokenizer]
    if getattr(model, "_no_split_modules", None) is None:
        model._no_split_modules = list(getattr(model.lm, "_no_split_modules", None) or [])


def prepare_deepspeed(accelerator: Accelerator, model: UniCodeMLLM, grad_clip: float) -> None:
    """Before `prepare` under DeepSpeed: the trainer's clipping in the engine's config (`configure_deepspeed`), and
    the frozen visual tokenizer kept out of the engine, whole and in fp32 on every rank (it encodes images outside
    the model's forward, where ZeRO-3 would hold only a partition of it, and the engine would cast it to bf16).
    It stays reachable as `model.visual_tokenizer`, no longer a registered submodule: the engine's state dicts
    and checkpoints leave it out, and `save_final` takes it from a rebuilt model."""
    configure_deepspeed(accelerator, stage="train-mllm", grad_clip=grad_clip)
    tokenizer = model._modules.pop("visual_tokenizer")
    model.__dict__["visual_tokenizer"] = tokenizer.to(accelerator.device)


def build_model(cfg: MLLMTrainConfig) -> UniCodeMLLM:
    """The LM + frozen visual tokenizer + compressor of `cfg.model`, with LoRA adapters when enabled.

    The compressor is a submodule of the model: its parameters (if any) train with the LM (also under LoRA,
    which wraps only the LM) and are saved in checkpoints and in `compressor.safetensors`.
    """
    m = cfg.model
    for name, value in (("model.lm", m.lm), ("model.visual_tokenizer", m.visual_tokenizer)):
        if not value:
            raise UserError(f"{name} is empty: set it, e.g. --set {name}=PATH")
    if not Path(m.visual_tokenizer).is_dir():
        raise UserError(f"model.visual_tokenizer {m.visual_tokenizer} is not a folder; train one with train-tokenizer")
    model = UniCodeMLLM.from_components(
        m.lm,
        m.visual_tokenizer,
        reading=m.reading,
        template=m.template,
        compressor=m.compressor.to_compressor_config(),
        dtype=frozen_weights_dtype(cfg),
    )
    if m.lora.enabled:
        targets = m.lora.target_modules
        target_modules = targets if targets == "all-linear" else tuple(t.strip() for t in targets.split(","))
        model.enable_lora(
            LoraSettings(r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout, target_modules=target_modules)
        )
        if m.lora.train_embeddings:
            model.lm.get_input_embeddings().weight.requires_grad_(True)
        for parameter in model.trainable_parameters():  # adapters and embeddings train in fp32 over a bf16 base
            parameter.data = parameter.data.float()
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model.lm)
    return model


def frozen_weights_dtype(cfg: MLLMTrainConfig) -> torch.dtype:
    """The dtype the LM is loaded in. Full fine-tuning: fp32 master weights whatever the checkpoint stores
    (transformers loads 'auto': fp16 for many 7B LMs, where AdamW's eps underflows and untouched embedding rows
    turn NaN), bf16 coming from autocast. LoRA in bf16: the frozen base in bf16 (7B x 2 bytes = 14 GB a GPU
    instead of 28), while the adapters and the trainable embeddings stay fp32 (`build_model`)."""
    if not cfg.model.lora.enabled:
        return torch.float32
    precision = accelerate_precision(cfg.train.mixed_precision, select_device(cfg.train.device))
    return torch.bfloat16 if precision == "bf16" else torch.float32


def enable_activation_checkpointing(lm: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward, non-reentrant: it works under DDP with unused parameters
    and with frozen inputs (LoRA)."""
    options = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


class MLLMTrainer:
    """Owns the model, optimizer, data and logs of one stage-2 run (usable step by step in tests)."""

    def __init__(self, cfg: MLLMTrainConfig, out_dir: str | Path | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir or cfg.train.out_dir)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.accelerator = _accelerator(cfg, self.out_dir)
        seed_everything(cfg.train.seed)
        model = build_model(cfg)
        o = cfg.optim
        optimizer = adamw_decaying_matrices(model.parameters(), o.lr, o.betas, o.weight_decay)
        if is_deepspeed(self.accelerator):  # DeepSpeed drops an empty group (LoRA: no norm trains), the schedule too
            optimizer.param_groups = [group for group in optimizer.param_groups if group["params"]]
        warmup = round(o.warmup_ratio * cfg.train.steps)
        self.scheduler = LambdaLR(optimizer, WarmupCosine(warmup, cfg.train.steps, o.min_lr_ratio))
        if is_fsdp(self.accelerator):
            prepare_fsdp(self.accelerator, model)
        if is_deepspeed(self.accelerator):
            prepare_deepspeed(self.accelerator, model, cfg.optim.grad_clip)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        d = cfg.data
        self.skips = SkipCounter(strict=False, max_skip_fraction=d.max_skip_fraction)
        self.builder = MLLMSampleBuilder(
            self.mllm.text_tokenizer,
            self.mllm.code_shape,
            template=cfg.model.template,
            reading=cfg.model.reading,
            max_length=d.max_length,
            strict=False,
            overflow=d.overflow,
            num_segments=d.num_segments,
            seed=cfg.train.seed,
            skips=self.skips,
            read_tokens_per_image=self.mllm.tokens_per_image,  # the compressor's span; decompression reads h*w
        )
        self.collator = MLLMCollator(pad_token_id=self.mllm.token_ids.pad)
        self.packed_collator = PackedCollator(pad_token_id=self.mllm.token_ids.pad)
        self._packing: bool | None = None  # data.packing, once the LM was checked (`packing`)
        self.sources = {source.name: source for source in d.resolved_sources()}
        self.mixtures = {
            name: TaskMixture(source.tasks.as_dict(), cfg_drop_rate=d.cfg_drop_rate, seed=cfg.train.seed)
            for name, source in self.sources.items()
        }
        check_sequence_lengths(self.builder, self.mllm, d, self.mixtures.values())
        self.record_token_ids = RecordTokenIds(self.mllm.visual_tokenizer, d.token_ids, self.accelerator.device)
        self.step = 0
        self.positions = {name: DataPosition() for name in self.sources}
        self.draws = 0  # micro-batches drawn so far (SourceMixture's position)
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", keep_last=cfg.train.keep_checkpoints)
        self.files = RunFiles(self.out_dir, self.accelerator, cfg)
        self._saved: tuple[int, Path | None] | None = None  # (step, folder) of the last checkpoint written or loaded
        self._batches: SourceMixture | None = None
        self._reader_skips: dict[str, dict[str, Any]] = {}  # per source, of a resumed run, until the streams exist
        self._eval_samples: list[EvalSample] | None = None

    @property
    def mllm(self) -> UniCodeMLLM:
        return self.accelerator.unwrap_model(self.model)

    # ----- data -------------------------------------------------------------------------------------

    def _dataset(self, shards: str, split: str, shuffle: bool) -> StreamingDataset:
        state = self.accelerator.state
        policy = self.cfg.data.image if shuffle else self.cfg.data.image.for_eval()
        return StreamingDataset(
            shards,
            split,
            shuffle=shuffle,
            seed=self.cfg.train.seed,
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            rank=state.process_index if shuffle else 0,
            world_size=state.num_processes if shuffle else 1,
            image_format="tensor",
            image_size=self.mllm.visual_tokenizer.config.image_size,
            image_policy=policy,
        )

    def _stream(self, name: str) -> MLLMBatches:
        d, source = self.cfg.data, self.sources[name]
        position = self.positions[name]
        stream = MLLMBatches(
            self._dataset(source.shards, source.train_split, shuffle=True),
            self.builder,
            self.record_token_ids,
            self.mixtures[name],
            records_per_batch=d.records_per_batch,
            vqa_turns=d.vqa_turns,
            num_workers=d.num_workers,
            max_skip_fraction=d.max_skip_fraction,
            position=DataPosition(position.epoch, position.batch),
            source=name,
        )
        stream.records.report.load_state_dict(self._reader_skips.get(name, {}))
        return stream

    def next_samples(self) -> list[MLLMSample]:
        if self._batches is None:
            streams = {name: self._stream(name) for name in self.sources}
            weights = {name: source.weight for name, source in self.sources.items()}
            self._batches = SourceMixture(streams, weights, self.cfg.train.seed, draws=self.draws)
            self._iter = iter(self._batches)
        name, samples = next(self._iter)
        stream = self._batches.streams[name]
        self.positions[name] = DataPosition(stream.position.epoch, stream.position.batch)
        self.draws = self._batches.draws
        return samples

    def eval_samples(self) -> list[EvalSample]:
        """Built once: `eval.records` records of each eval split of every source that holds it (validation
        never skips silently either); a split's samples from several sources are scored together."""
        if self._eval_samples is None:
            samples: list[EvalSample] = []
            for split in self.cfg.eval.splits:
                for source in self.sources.values():
                    if split not in read_manifest(source.shards).splits:
                        continue  # check_eval_splits made sure some source holds it
                    samples += self._eval_split(source.shards, split)
            self._eval_samples = samples
        return self._eval_samples

    def _eval_split(self, shards: str, split: str) -> list[EvalSample]:
        self.builder.skips.source = f"{split} (eval)"  # counted apart from the training sources
        loader = torch.utils.data.DataLoader(
            self._dataset(shards, split, shuffle=False), batch_size=self.cfg.eval.batch_size, collate_fn=collate
        )
        pairs: list[tuple[dict[str, Any], Any]] = []
        for records in loader:
            if not records["key"]:
                continue
            pairs += list(zip(records["meta"], self.record_token_ids(records, self.builder), strict=True))
            if len(pairs) >= self.cfg.eval.records:
                break
        return build_eval_samples(self.builder, pairs[: self.cfg.eval.records], split)

    # ----- one step ---------------------------------------------------------------------------------

    def loss_scales(self, samples: list[MLLMSample]) -> dict[int, float]:
        """Per sample (by id()): the factor on its summed token losses that makes the step's loss.

        `tokens`: the mean over every labelled token of the step. `tasks`: the weighted mean over the
        tasks present of each task's token mean (text_to_image_uncond counts as text_to_image), so
        the 256 code targets of an image do not drown the two answer tokens of a question.

        Over several processes the counts are those of the whole step (all-reduced), and the factors are
        multiplied by the number of processes, which DDP and FSDP divide the summed gradients by: the step's
        gradient is that of one process training on every rank's samples, whatever each rank's token count.
        """
        tokens = {id(s): int((s.labels[1:] != IGNORE_INDEX).sum()) for s in samples}
        task_of = {id(s): s.task.removesuffix("_uncond") for s in samples}
        names = sorted(set(TRAIN_TASKS) - {"text_to_image_uncond"})
        local = [sum(n for key, n in tokens.items() if task_of[key] == task) for task in names]
        per_task = dict(zip(names, self._step_totals(local), strict=True))  # task -> labelled tokens of the step
        ranks = self.accelerator.num_processes
        if self.cfg.data.loss_weighting == "tokens":
            total = max(1, sum(per_task.values()))
            return {key: ranks / total for key in tokens}
        weights = self.cfg.data.loss_weights.as_dict()
        present = {t: n for t, n in per_task.items() if n > 0}
        norm = sum(weights[t] for t in present) or 1.0
        return {
            key: ranks * weights[task_of[key]] / (norm * present[task_of[key]]) if tokens[key] else 0.0
            for key in tokens
        }

    def _step_totals(self, counts: list[int]) -> list[int]:
        """`counts` summed over every process (itself in a single process)."""
        if self.accelerator.num_processes == 1:
            return counts
        summed = self.accelerator.reduce(torch.tensor(counts, device=self.accelerator.device), "sum")
        return [int(n) for n in summed.tolist()]

    def packing(self) -> bool:
        """data.packing, when the LM keeps packed samples apart: checked numerically once, at the first step, on
        the LM's own device and attention implementation (`packing_problem`); otherwise one info line and
        length-sorted chunks. Every process runs the check, through the prepared model (whose forward may be
        collective under FSDP)."""
        if self._packing is None:
            self._packing = False
            if self.cfg.data.packing:
                vocab = zero_shape(self.mllm.lm.get_input_embeddings().weight)[0]  # ZeRO-3 partitions it
                problem = packing_problem(self.model, vocab, self.accelerator.device)
                if problem is None:
                    self._packing = True
                else:
                    log.info("data.packing: falling back to length-sorted chunks: the LM %s", problem)
        return self._packing

    def forward_chunks(self, samples: list[MLLMSample], packing: bool) -> list[Rows]:
        """One group's forward passes, each a list of rows: packed rows of up to data.max_length tokens, or one
        sample a row cut by `length_chunks`. Both are pure functions of the samples (exact resume)."""
        d = self.cfg.data
        if packing:
            return packed_chunks(samples, d.max_tokens_per_forward, min(d.max_length, d.max_tokens_per_forward))
        return [[[s] for s in chunk] for chunk in length_chunks(samples, d.max_tokens_per_forward)]

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum` sample groups; returns the step's logs.

        The loss is over every labelled token of the step (all groups, all forward passes), weighted
        as `data.loss_weighting` says (`loss_scales`); each pass back-propagates its share.
        """
        acc, model = self.accelerator, self.model
        model.train()
        groups = [self.next_samples() for _ in range(self.cfg.optim.grad_accum)]
        packing = self.packing()
        chunks = [c for g in groups for c in self.forward_chunks(g, packing)]
        row_scale = self.loss_scales([s for g in groups for s in g])  # sample_id(task) -> loss multiplier
        loss_sum = torch.zeros((), device=acc.device)
        task_sum: dict[str, float] = defaultdict(float)
        task_tokens: dict[str, float] = defaultdict(float)
        for i, rows in enumerate(chunks):
            batch = self.packed_collator(rows)  # one sample a row unless packing
            inputs = {k: batch[k].to(acc.device) for k in MODEL_INPUTS if k != "labels"}
            if packing:  # per-sample positions; the LM then keeps the samples of a row apart
                inputs["position_ids"] = batch["position_ids"].to(acc.device)
            labels = batch["labels"].to(acc.device)
            last = i == len(chunks) - 1
            with accumulation(acc, model, last):  # gradients are synchronised (DeepSpeed: stepped) on the last pass
                with acc.autocast():
                    logits = model(**inputs).logits  # (b, t, V)
                    losses, mask = token_losses(logits, labels)  # (b, t-1) each
                    flat = batch["samples"]  # the chunk's k samples, row by row
                    sums, counts = sample_losses(losses, mask, batch["sample_index"], len(flat))  # (k,) each
                    scale = torch.tensor([row_scale[id(x)] for x in flat], device=acc.device)  # (k,)
                    chunk_loss = (sums * scale).sum()
                acc.backward(chunk_loss)
            loss_sum += chunk_loss.detach()
            for task, loss, n in zip(batch["tasks"], sums.detach().tolist(), counts.tolist(), strict=True):
                task_sum[task] += loss
                task_tokens[task] += n
        clip = self.cfg.optim.grad_clip
        grad_norm = acc.clip_grad_norm_(self.mllm.trainable_parameters(), clip if clip > 0 else math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        logs: dict[str, Any] = {
            "step": self.step,
            "loss": float(acc.reduce(loss_sum, "mean")),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,  # DeepSpeed: its engine's norm
            "lr": self.scheduler.get_last_lr()[0],
            "tokens": sum(len(s) for g in groups for s in g),
            "padded_tokens": padded_tokens(chunks),
            "samples": sum(len(g) for g in groups),
            "forward_passes": len(chunks),
        }
        for task in TRAIN_TASKS:
            if task_tokens[task]:
                logs[f"loss_{task}"] = task_sum[task] / task_tokens[task]
        return logs

    def reply_end_ids(self) -> set[int]:
        """eos, and the template's end of a non-final reply when it is one token (decoding stops at both)."""
        text_tokenizer = self.mllm.text_tokenizer
        ends = {int(text_tokenizer.eos_token_id)}
        separator = text_tokenizer.encode(self.builder.template.assistant_end, add_special_tokens=False)
        if len(separator) == 1:
            ends.add(int(separator[0]))
        return ends

    def evaluate(self) -> dict[str, float]:
        return evaluate_teacher_forced(
            self.mllm,
            self.eval_samples(),
            self.collator,
            batch_size=self.cfg.eval.batch_size,
            device=self.accelerator.device,
            reply_end_ids=self.reply_end_ids(),
        )

    # ----- checkpoints ------------------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights (under FSDP each rank's shards, whose `.shape` is the full shape)."""
        return {n: p.detach() for n, p in self.mllm.named_parameters() if p.requires_grad}

    def _gathered_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Under FSDP, collectively (every rank calls it, in the same order: each `full_tensor()` is one
        all-gather): the full trainable weights and the full optimizer state, on CPU on the main process ({} on
        the others). The optimizer state keeps `optimizer.state_dict()`'s layout (parameter ids), so a checkpoint
        is the same whether one process, DDP or FSDP wrote it, and each resumes from the others'."""
        main = self.accelerator.is_main_process
        trainable = gather_tensors(((n, p) for n, p in self.mllm.named_parameters() if p.requires_grad), main)
        return trainable, gather_optimizer_state(self.optimizer, main)

    def save_checkpoint(self) -> Path | None:
        """Save this step's checkpoint, unless it is the one just saved or loaded (a step folder is never
        written twice: the end of `fit` follows the loop's own save)."""
        if self._saved is not None and self._saved[0] == self.step:
            return self._saved[1]
        acc = self.accelerator
        acc.wait_for_everyone()
        if is_deepspeed(acc):
            return self._save_zero_checkpoint()
        if is_fsdp(acc):
            trainable, optimizer_state = self._gathered_state()
        elif acc.is_main_process:
            trainable, optimizer_state = self._trainable_state(), self.optimizer.state_dict()
        if not acc.is_main_process:
            self._saved = (self.step, None)
            return None
        opt_tree, opt_tensors = split_tensors(optimizer_state, "optimizer")
        tensors = {"trainable": trainable, "optimizer": opt_tensors}
        self._saved = (self.step, self.ckpt.save(self.step, tensors, {"optimizer": opt_tree, **self._run_state()}))
        return self._saved[1]

    def _save_zero_checkpoint(self) -> Path | None:
        """Under DeepSpeed, on every rank: the full fp32 trainable weights (gathered to the main process) and
        each rank's own ZeRO partitions of the optimizer (optimizer.rank{R}.safetensors, written by that rank into
        the same atomic step folder); resuming needs the same launch (`check_zero_launch`)."""
        acc = self.accelerator
        named = ((n, p) for n, p in self.mllm.named_parameters() if p.requires_grad)
        trainable = gather_tensors(named, acc.is_main_process)
        tree, local = split_tensors(zero_partition_state(self.optimizer.optimizer), "zero")
        state = {"optimizer": {"zero": zero_launch(acc), "partitions": tree}, **self._run_state()}
        path = self.ckpt.save_collective(self.step, {"trainable": trainable}, state, "optimizer", local)
        self._saved = (self.step, path if acc.is_main_process else None)
        return self._saved[1]

    def _run_state(self) -> dict[str, Any]:
        """A checkpoint's JSON state besides the optimizer: the schedule, data position, skips and RNG."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "data": {"draws": self.draws, "sources": {n: p.to_dict() for n, p in self.positions.items()}},
            "skips": self.skips.state_dict(),
            "reader_skips": self.reader_skips_state(),
            "rng": capture_rng_state(),
        }

    def checkpoint_layout(self) -> CheckpointLayout:
        """What a step folder of this run holds (the trainable weights of this config exactly): resuming checks
        it whole and falls back past a damaged one."""
        trainable = {n: zero_shape(p) for n, p in self.mllm.named_parameters() if p.requires_grad}  # full shapes
        groups = (
            {"trainable": trainable} if is_deepspeed(self.accelerator) else {"trainable": trainable, "optimizer": None}
        )
        return CheckpointLayout(tensors=groups, state=("optimizer", "scheduler", "data", "rng"))

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        # CPU: the optimizer keeps its step counters there (no GPU sync per step)
        ckpt = self.ckpt.load(path, layout=self.checkpoint_layout())
        if is_deepspeed(self.accelerator):
            self._load_zero(ckpt)
        elif is_fsdp(self.accelerator):
            optimizer_state = join_tensors(ckpt.state["optimizer"], ckpt.tensors.get("optimizer", {}))
            self._load_sharded(ckpt.tensors["trainable"], optimizer_state)
        else:
            optimizer_state = join_tensors(ckpt.state["optimizer"], ckpt.tensors.get("optimizer", {}))
            parameters = dict(self.mllm.named_parameters())
            with torch.no_grad():
                for name, tensor in ckpt.tensors["trainable"].items():
                    parameters[name].copy_(tensor)
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        self.step = ckpt.step
        self._saved = (ckpt.step, ckpt.path)
        self._load_data_state(ckpt.state, ckpt.path)
        self._batches = None
        restore_rng_state(ckpt.state["rng"])
        log.info("resumed from %s (step %d)", ckpt.path, ckpt.step)

    def _load_sharded(self, trainable: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        """Under FSDP, on every rank (each read the same full checkpoint): each sharded parameter and its
        optimizer moments keep this rank's slice of the full tensors, cut as FSDP cut the parameter."""
        parameters = dict(self.mllm.named_parameters())
        with torch.no_grad():
            for name, tensor in trainable.items():
                parameters[name].copy_(shard_like(tensor, parameters[name]))
        load_full_optimizer_state(self.optimizer, optimizer_state)

    def _load_zero(self, ckpt: Checkpoint) -> None:
        """Under DeepSpeed, on every rank: the full trainable weights into the engine's parameters (ZeRO-3: into
        their partitions), and this rank's own ZeRO partitions (fp32 master weights, AdamW state) of the optimizer."""
        acc, saved = self.accelerator, ckpt.state["optimizer"]
        check_zero_launch(saved.get("zero") if isinstance(saved, dict) else None, acc, ckpt.path)
        load_full_parameters(dict(self.mllm.named_parameters()), ckpt.tensors["trainable"])
        local = load_shard(ckpt.path, "optimizer", acc.process_index)
        load_zero_partition_state(self.optimizer.optimizer, join_tensors(saved["partitions"], local))

    def _load_data_state(self, state: dict[str, Any], where: Path) -> None:
        data, reader = state["data"], state.get("reader_skips", {})
        if "sources" not in data:  # a checkpoint of one source, before data.sources existed
            name = next(iter(self.sources))
            data = {"draws": 0, "sources": {name: data}}
            reader = {name: reader}
        if set(data["sources"]) != set(self.sources):
            raise UserError(
                f"{where}: checkpoint was taken with data sources {sorted(data['sources'])}, the config has "
                f"{sorted(self.sources)}; resume with the same data.sources"
            )
        self.positions = {name: DataPosition(**pos) for name, pos in data["sources"].items()}
        self.draws = int(data["draws"])
        self.skips.load_state_dict(state.get("skips", {}))
        self._reader_skips = reader

    def reader_skips_state(self) -> dict[str, dict[str, Any]]:
        """What the shard readers skipped so far (corrupt images, broken shards), per source, as checkpoint JSON."""
        if self._batches is None:
            return dict(self._reader_skips)
        return {name: stream.records.report.state_dict() for name, stream in self._batches.streams.items()}

    def reader_summary(self) -> str:
        """One line, e.g. "skipped 10 of 40 samples (25.00%): 10 corrupt image" (records as read from the shards),
        per source when there are several."""
        parts = []
        for name, state in self.reader_skips_state().items():
            parts.append((f"{name}: " if len(self.sources) > 1 else "") + SkipReport.from_state(state).summary())
        return "; ".join(parts) if parts else SkipReport().summary()

    def check_skips(self) -> None:
        """data.max_skip_fraction over the whole run, whatever its length (the streams check as they go too)."""
        self.skips.check()
        for state in self.reader_skips_state().values():
            SkipReport.from_state(state, self.cfg.data.max_skip_fraction, setting="data.max_skip_fraction").check()

    # ----- the run ------------------------------------------------------------------------------------

    def fit(self, resume: bool | str = False, allow_changed: Sequence[str] = ()) -> MLLMTrainResult:
        """Train to `train.steps` under the run lock; `resume` (True or a step folder) continues the run in
        out_dir, whose config.yaml the config must match but for `allow_changed` keys (`check_resume_config`)."""
        with self.files.lock():
            return self._fit(resume, allow_changed)

    def _fit(self, resume: bool | str, allow_changed: Sequence[str]) -> MLLMTrainResult:
        cfg, acc = self.cfg, self.accelerator
        if resume or self.step == 0:  # a trainer that has stepped or loaded continues its own run
            self.files.start(resume, allow_changed)
        if resume:
            self.load_checkpoint(None if resume is True else resume)
        image_size = self.mllm.visual_tokenizer.config.image_size
        check_sources(self.sources.values(), cfg.eval.splits, cfg.data.image, image_size)  # before step 1
        self.files.write_config()
        self.files.trim_metrics(self.step)
        started = time.perf_counter()
        train_seconds = 0.0  # optimizer steps only: evaluation and checkpoints excluded
        last_eval: dict[str, float] = {}
        with make_progress(disable=not acc.is_main_process) as progress, StopOnInterrupt(acc) as interrupt:
            task = progress.add_task("stage 2: MLLM", total=cfg.train.steps, completed=self.step, stats="")
            while self.step < cfg.train.steps:
                if interrupt.requested:
                    interrupt.stop(self.step, self.save_checkpoint())
                step_started = time.perf_counter()
                logs = self.train_step()
                train_seconds += time.perf_counter() - step_started
                if not math.isfinite(logs["loss"]):
                    raise UserError(f"loss became {logs['loss']} at step {self.step}; lower optim.lr or check data")
                step = self.step
                logs["seconds"] = round(time.perf_counter() - started, 2)
                logs["train_seconds"] = round(train_seconds, 2)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    self._log(logs)
                if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                    last_eval = self.evaluate()
                    self._log({"step": step, **last_eval})
                if step % cfg.train.ckpt_every == 0:
                    self.save_checkpoint()
                vqa = last_eval.get(f"{cfg.eval.splits[-1]}/vqa_exact") if cfg.eval.splits else None
                progress.update(
                    task,
                    completed=step,
                    stats=f"loss {logs['loss']:.3f}" + (f" vqa {100 * vqa:.1f}%" if vqa is not None else ""),
                )
                if out_of_time(started, cfg.train.max_minutes, self.accelerator.device):  # the same step on every rank
                    log.warning(
                        "train.max_minutes=%s reached at step %d: saving and stopping", cfg.train.max_minutes, step
                    )
                    if step % cfg.train.eval_every:
                        last_eval = self.evaluate()
                        self._log({"step": step, **last_eval})
                    break
        self.save_checkpoint()
        self.check_skips()  # after the checkpoint: a run stopped here resumes, nothing is lost
        final_dir = self.save_final()
        metrics = {
            "step": self.step,
            "seconds": round(time.perf_counter() - started, 1),
            "train_seconds": round(train_seconds, 2),
            **last_eval,
        }
        metrics["data"] = self.skips.summary()
        metrics["data_reader"] = self.reader_summary()
        self.files.write_final_metrics(metrics)
        if acc.is_main_process:
            self.plot()
        self.files.finish("mllm", final_dir)  # the model card and the trackers' end
        log.info("stage 2 data: shard reader %s; sample builder %s", self.reader_summary(), self.skips.summary())
        return MLLMTrainResult(final_dir, self.step, metrics)

    def _log(self, row: dict[str, Any]) -> None:
        self.files.log(row)

    def plot(self) -> Path | None:
        splits = self.cfg.eval.splits
        return self.files.plot(
            {
                "train loss per task": ["loss", *[f"loss_{t}" for t in TRAIN_TASKS]],
                "eval loss per task": [
                    f"{s}/loss_{t}" for s in splits for t in ("vqa", "text_to_image", "decompression")
                ],
                "VQA exact match (greedy)": [f"{s}/vqa_exact" for s in splits],
                "next-code accuracy": [f"{s}/code_acc_{t}" for s in splits for t in ("text_to_image", "decompression")],
            },
            log_scale=("train loss per task", "eval loss per task"),
        )

    def save_final(self) -> Path:
        """`save_pretrained` into out_dir/final via a temporary folder; LoRA adapters are also kept apart
        (out_dir/final_lora) and merged into the saved LM."""

        zero = is_deepspeed(self.accelerator)
        full = self.accelerator.get_state_dict(self.model) if zero or is_fsdp(self.accelerator) else None  # collective

        def save(tmp: Path) -> None:
            model = self.mllm
            if full is not None:  # FSDP: the main process saves a whole copy of the model from the gathered tensors
                with torch.random.fork_rng():
                    model = build_model(self.cfg)
                loaded = model.load_state_dict(full, strict=not zero)
                if zero:  # the engine's state dict leaves out the visual tokenizer (`prepare_deepspeed`)
                    left = [k for k in loaded.missing_keys if not k.startswith("visual_tokenizer.")]
                    if left or loaded.unexpected_keys:
                        raise RuntimeError(
                            f"DeepSpeed's state dict does not fit the model: {left or loaded.unexpected_keys}"
                        )
            if model.has_lora:
                adapter = self.out_dir / "final_lora"
                shutil.rmtree(adapter, ignore_errors=True)
                model.save_lora_adapter(adapter)
                model.merge_lora()
            model.save_pretrained(tmp)

        return self.files.save_final(save)


def train_mllm(
    cfg: MLLMTrainConfig,
    out_dir: str | Path | None = None,
    resume: bool | str = False,
    allow_changed: Sequence[str] = (),
) -> MLLMTrainResult:
    """Run stage 2 to `cfg.train.steps` (or `train.max_minutes`); returns where the model was saved.

    Refuses (UserError) a folder another run is writing (the run lock), to overwrite a run in `out_dir` unless
    `resume`, `resume=True` without a checkpoint, and a resume whose config differs from the run's config.yaml
    in other keys than `allow_changed` and those that are safe to change (run_files.RESUME_MAY_CHANGE).
    """
    return run_stage(MLLMTrainer, cfg, out_dir, resume, allow_changed)
