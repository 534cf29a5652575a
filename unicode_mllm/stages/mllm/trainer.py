"""Stage 2 on the shared loop (runtime/training_loop.py): one causal LM learns to read images (VQA, captions)
and write them (text-to-image, decompression) with the frozen stage-1 visual tokenizer, through `accelerate`.

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
from collections.abc import Iterator, Sequence
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
from unicode_mllm.runtime.checkpoint import Checkpoint, CheckpointLayout, CheckpointManager
from unicode_mllm.runtime.devices import accelerate_precision, select_device
from unicode_mllm.runtime.lr_schedule import WarmupCosine
from unicode_mllm.runtime.optimizer import adamw_decaying_matrices
from unicode_mllm.runtime.run_files import RunFiles
from unicode_mllm.runtime.seeding import seed_everything
from unicode_mllm.runtime.sharded import load_full_parameters, shard_like, zero_shape
from unicode_mllm.runtime.trackers import accelerator_kwargs
from unicode_mllm.runtime.training_loop import (
    CheckpointContents,
    TrainingStage,
    check_loss,
    load_optimizer,
    model_and_optimizer,
    run_stage,
)
from unicode_mllm.shard_manifest import read_manifest
from unicode_mllm.stages.mllm.config import MLLMTrainConfig
from unicode_mllm.stages.mllm.eval_set import EvalSample, build_eval_samples, evaluate_teacher_forced, token_losses
from unicode_mllm.stages.mllm.sample_stream import MLLMBatches, RecordTokenIds, SourceMixture, length_chunks
from unicode_mllm.stages.mllm.task_mixture import TaskMixture
from unicode_mllm.stages.mllm.up_front_checks import check_sequence_lengths, check_sources

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


class MLLMTrainer(TrainingStage):
    """Owns the model, optimizer, data and logs of one stage-2 run (usable step by step in tests)."""

    description = "stage 2: MLLM"

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

    def _trainable(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The trainable parameters by name (under FSDP each rank's shards, whose `.shape` is the full shape)."""
        return ((n, p) for n, p in self.mllm.named_parameters() if p.requires_grad)

    def checkpoint_contents(self) -> CheckpointContents | None:
        """The trainable weights and the optimizer (`model_and_optimizer`), the schedule, data position and skips."""
        return model_and_optimizer(
            self.accelerator, self._trainable, self.optimizer, "trainable", self._run_state(), "optimizer"
        )

    def _run_state(self) -> dict[str, Any]:
        """A checkpoint's JSON state besides the optimizer and the RNG: the schedule, data position and skips."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "data": {"draws": self.draws, "sources": {n: p.to_dict() for n, p in self.positions.items()}},
            "skips": self.skips.state_dict(),
            "reader_skips": self.reader_skips_state(),
        }

    def checkpoint_layout(self) -> CheckpointLayout:
        """The trainable weights of this config exactly, full shapes (under DeepSpeed the optimizer's partitions
        are checked when loaded)."""
        trainable = {n: zero_shape(p) for n, p in self._trainable()}  # full shapes
        groups = (
            {"trainable": trainable} if is_deepspeed(self.accelerator) else {"trainable": trainable, "optimizer": None}
        )
        return CheckpointLayout(tensors=groups, state=("optimizer", "scheduler", "data", "rng"))

    def load_state(self, ckpt: Checkpoint) -> None:
        """On every rank (each read the same full checkpoint): the full trainable weights into the engine's
        parameters under DeepSpeed (ZeRO-3: into their partitions), else each rank's slice of them as FSDP cut
        the parameter (the whole tensor without FSDP); then the optimizer (`load_optimizer`)."""
        parameters = dict(self.mllm.named_parameters())
        if is_deepspeed(self.accelerator):
            load_full_parameters(parameters, ckpt.tensors["trainable"])
        else:
            with torch.no_grad():
                for name, tensor in ckpt.tensors["trainable"].items():
                    parameters[name].copy_(shard_like(tensor, parameters[name]))
        load_optimizer(self.accelerator, self.optimizer, ckpt)
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        self._load_data_state(ckpt.state, ckpt.path)
        self._batches = None

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

    # ----- the run (runtime/training_loop.py's hooks) ----------------------------------------------------------

    def prepare_run(self, resume: bool | str) -> None:
        if resume:
            self.load_checkpoint(None if resume is True else resume)
        image_size = self.mllm.visual_tokenizer.config.image_size
        check_sources(self.sources.values(), self.cfg.eval.splits, self.cfg.data.image, image_size)  # before step 1
        self.train_seconds = 0.0  # optimizer steps only: evaluation and checkpoints excluded
        self.last_eval: dict[str, float] = {}

    def run_step(self) -> dict[str, Any]:
        step_started = time.perf_counter()
        logs = self.train_step()
        self.train_seconds += time.perf_counter() - step_started
        check_loss(logs["loss"], self.step)
        logs["seconds"] = round(time.perf_counter() - self.started, 2)
        logs["train_seconds"] = round(self.train_seconds, 2)
        return logs

    def record(self, logs: dict[str, Any], *, log_step: bool, eval_step: bool) -> None:
        if log_step:
            self.files.log(logs)
        if eval_step:
            self._evaluate_and_log()

    def _evaluate_and_log(self) -> None:
        self.last_eval = self.evaluate()
        self.files.log({"step": self.step, **self.last_eval})

    def progress_stats(self, logs: dict[str, Any]) -> str:
        splits = self.cfg.eval.splits
        vqa = self.last_eval.get(f"{splits[-1]}/vqa_exact") if splits else None
        return f"loss {logs['loss']:.3f}" + (f" vqa {100 * vqa:.1f}%" if vqa is not None else "")

    def stopped_early(self, step: int) -> None:
        if step % self.cfg.train.eval_every:  # the stopped run's last figures
            self._evaluate_and_log()

    def finish(self) -> MLLMTrainResult:
        self.check_skips()  # after the checkpoint: a run stopped here resumes, nothing is lost
        final_dir = self.save_final()
        metrics = {
            "step": self.step,
            "seconds": round(time.perf_counter() - self.started, 1),
            "train_seconds": round(self.train_seconds, 2),
            **self.last_eval,
        }
        metrics["data"] = self.skips.summary()
        metrics["data_reader"] = self.reader_summary()
        self.files.write_final_metrics(metrics)
        if self.accelerator.is_main_process:
            self.plot()
        self.files.finish("mllm", final_dir)  # the model card and the trackers' end
        log.info("stage 2 data: shard reader %s; sample builder %s", self.reader_summary(), self.skips.summary())
        return MLLMTrainResult(final_dir, self.step, metrics)

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
    """Run stage 2 to `cfg.train.steps` (or `train.max_minutes`); returns where the model was saved. What it
    refuses: `run_stage` (runtime/training_loop.py)."""
    return run_stage(MLLMTrainer, cfg, out_dir, resume, allow_changed)
