"""Stage-2 compressor ablation: one run per compressor with equal budgets, then cost and accuracy side by side.

    cfg = load_config(MLLMTrainConfig, "configs/mllm/tiny.yaml")
    rows = run_compressor_ablation(cfg, "runs/compressor_ablation", ["identity", "pool2x", "qwen2vl_merger"])

Each compressor gets a copy of the stage-2 config that differs only in `model.compressor` and the run folder
(`OUT/<label>`): same LM, visual tokenizer, data, steps, seed and optimizer. `train.max_minutes` is switched
off so a slower compressor cannot stop after fewer steps than the others. Per run it reports:

- tokens per image: `UniCodeMLLM.tokens_per_image` of the trained model (the compressor's
  `num_output_tokens(h, w)`);
- prefill time: the mean wall time of one forward pass (compressor + splice + LM, no grad, eval mode) over a
  fixed batch of VQA prompts (the first question of the first `prefill_batch_size` records of the last eval
  split, the same images for every compressor), after one warm-up pass, over `prefill_repeats` passes;
- training time: the trainer's `train_seconds` (optimizer steps only; evaluation and checkpoints excluded);
- VQA accuracy: the trainer's final teacher-forced `{split}/vqa_exact` (greedy exact match, eval_set.py) on
  every eval split, the held-out one being the headline.

Labels are either a preset of `ABLATION_PRESETS` (options sized for a 4x reduction of the tokenizer's grid and
a small resampler) or any registered compressor name with its default options.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unicode_mllm.addons.compression import COMPRESSORS, CompressorConfig
from unicode_mllm.config import config_from_dict, config_to_dict
from unicode_mllm.data.mllm_samples import MODEL_INPUTS, MLLMCollator
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation.skips import SkipCounts
from unicode_mllm.evaluation.vqa import shapes_vqa_items
from unicode_mllm.model.mllm import UniCodeMLLM
from unicode_mllm.runtime.devices import select_device
from unicode_mllm.stages.mllm.config import MLLMTrainConfig
from unicode_mllm.stages.mllm.trainer import train_mllm

log = logging.getLogger(__name__)

DEFAULT_COMPRESSORS: tuple[str, ...] = (
    "identity",
    "pool2x",
    "deco_avgpool",
    "ldpv2",
    "internvl_ps",
    "qwen2vl_merger",
    "qformer",
    "perceiver",
)


def _half(grid_hw: tuple[int, int]) -> tuple[int, int]:
    return (math.ceil(grid_hw[0] / 2), math.ceil(grid_hw[1] / 2))


def _heads(width: int) -> int:
    return next(h for h in (8, 4, 2, 1) if width % h == 0)


PresetFn = Callable[[tuple[int, int], int], CompressorConfig]

# label -> (grid (h, w), LLM width) -> config; every preset keeps about a quarter of the h*w tokens.
ABLATION_PRESETS: dict[str, PresetFn] = {
    "identity": lambda grid, width: CompressorConfig("identity"),
    "pool2x": lambda grid, width: CompressorConfig("pool2x", {"mode": "bilinear"}),
    "deco_avgpool": lambda grid, width: CompressorConfig("deco_avgpool", {"target_grid": _half(grid), "mlp_layers": 2}),
    "deco_pool_only": lambda grid, width: CompressorConfig(
        "deco_avgpool", {"target_grid": _half(grid), "mlp_layers": 0}
    ),
    "ldpv2": lambda grid, width: CompressorConfig("ldpv2", {"target_grid": _half(grid)}),
    "internvl_ps": lambda grid, width: CompressorConfig("internvl_ps", {"odd_grid": "pad"}),
    "qwen2vl_merger": lambda grid, width: CompressorConfig("qwen2vl_merger", {"odd_grid": "pad"}),
    "qformer": lambda grid, width: CompressorConfig(
        "qformer",
        {
            "num_queries": _half(grid)[0] * _half(grid)[1],
            "num_layers": 2,
            "hidden_width": width,
            "num_heads": _heads(width),
            "cross_attention_freq": 1,
        },
    ),
    "perceiver": lambda grid, width: CompressorConfig(
        "perceiver",
        {"num_latents": _half(grid)[0] * _half(grid)[1], "depth": 2, "num_heads": 4, "head_width": max(8, width // 4)},
    ),
}


def ablation_compressor(label: str, grid_hw: tuple[int, int], llm_width: int) -> CompressorConfig:
    """The compressor a label stands for: a preset of ABLATION_PRESETS, else a registered name with its defaults.

    Raises UserError for a label that is neither.
    """
    if label in ABLATION_PRESETS:
        return ABLATION_PRESETS[label](tuple(grid_hw), llm_width)
    if label in COMPRESSORS:
        return CompressorConfig(label)
    raise UserError(
        f"compressor {label!r} is unknown; choose presets from {sorted(ABLATION_PRESETS)} or registered compressors "
        f"{sorted(COMPRESSORS)}"
    )


def parse_compressor_list(text: str | None) -> list[str]:
    """'identity, pool2x' -> ['identity', 'pool2x']; None -> DEFAULT_COMPRESSORS. Raises UserError for repeats."""
    if text is None:
        return list(DEFAULT_COMPRESSORS)
    labels = [t.strip() for t in text.split(",") if t.strip()]
    if not labels:
        raise UserError("--compressors is empty; give a comma-separated list, e.g. identity,pool2x")
    repeated = sorted({t for t in labels if labels.count(t) > 1})
    if repeated:
        raise UserError(f"--compressors lists {repeated} more than once")
    return labels


@dataclass
class AblationRow:
    """One compressor's run: what it is, what it costs and how well the trained model answers."""

    label: str
    compressor: dict[str, Any]
    tokens_per_image: int
    compressor_parameters: int
    steps: int
    train_seconds: float
    prefill_ms: float
    vqa_exact: dict[str, float] = field(default_factory=dict)  # split -> teacher-forced greedy exact match
    run_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "compressor": self.compressor,
            "tokens_per_image": self.tokens_per_image,
            "compressor_parameters": self.compressor_parameters,
            "steps": self.steps,
            "train_seconds": self.train_seconds,
            "prefill_ms": self.prefill_ms,
            "vqa_exact": self.vqa_exact,
            "run_dir": self.run_dir,
        }


def _compact_options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "-"


def rows_to_markdown(rows: Sequence[AblationRow], splits: Sequence[str]) -> str:
    """A markdown table: one line per compressor, VQA exact match per eval split in percent."""
    head = ["compressor", "options", "tokens/image", "params", "steps", "train s", "prefill ms"]
    head += [f"{s} VQA exact" for s in splits]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.label,
            _compact_options(r.compressor.get("options", {})),
            str(r.tokens_per_image),
            f"{r.compressor_parameters:,}",
            str(r.steps),
            f"{r.train_seconds:.1f}",
            f"{r.prefill_ms:.2f}",
        ]
        cells += [f"{100 * r.vqa_exact[s]:.1f}%" if s in r.vqa_exact else "-" for s in splits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prefill_questions(cfg: MLLMTrainConfig, count: int) -> tuple[list[Any], list[str]]:
    """The first question of the first `count` records of the last eval split: (PIL images, questions)."""
    if not cfg.eval.splits:
        raise UserError("eval.splits is empty; the ablation needs an eval split for VQA prompts and accuracy")
    split = cfg.eval.splits[-1]
    images, questions = [], []
    for item in shapes_vqa_items(cfg.data.shards, split, SkipCounts()):
        if not item.source.endswith("#0"):  # one question per record
            continue
        images.append(item.image)
        questions.append(item.question)
        if len(questions) == count:
            break
    if not questions:
        raise UserError(f"{cfg.data.shards} split {split!r} gave no VQA questions for the prefill batch")
    return images, questions


@torch.no_grad()
def measure_prefill(model: UniCodeMLLM, batch: dict[str, Any], repeats: int, warmup: int = 1) -> float:
    """Mean wall time in seconds of one forward pass of `model` over a collated (left-padded) prompt batch."""
    if repeats < 1:
        raise UserError(f"prefill repeats must be >= 1, got {repeats}")
    device = next(model.lm.parameters()).device
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k != "labels"}
    was_training = model.training
    model.eval()
    try:
        times = []
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            model(**inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - started)
    finally:
        model.train(was_training)
    return sum(times) / len(times)


def ablation_config(cfg: MLLMTrainConfig, compressor: CompressorConfig, run_dir: Path) -> MLLMTrainConfig:
    """`cfg` with only `model.compressor` and `train.out_dir` changed and `train.max_minutes` off, re-validated."""
    data = config_to_dict(cfg)
    data["model"]["compressor"] = compressor.to_dict()
    data["train"]["out_dir"] = str(run_dir)
    data["train"]["max_minutes"] = None
    return config_from_dict(MLLMTrainConfig, data, source=f"compressor ablation ({compressor.name})")


def run_compressor_ablation(
    cfg: MLLMTrainConfig,
    out_dir: str | Path,
    compressors: Sequence[str] = DEFAULT_COMPRESSORS,
    *,
    prefill_batch_size: int = 16,
    prefill_repeats: int = 10,
) -> list[AblationRow]:
    """Train stage 2 once per compressor label with `cfg`'s budget; write OUT/comparison.{md,json}.

    Raises UserError (before any training) for an unknown label or a compressor the model's grid or reading
    mode cannot take.
    """
    from unicode_mllm.generation.answering import question_prompts
    from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

    out_dir = Path(out_dir)
    if prefill_batch_size < 1:
        raise UserError(f"prefill batch size must be >= 1, got {prefill_batch_size}")
    if not cfg.model.visual_tokenizer or not Path(cfg.model.visual_tokenizer).is_dir():
        raise UserError(f"model.visual_tokenizer {cfg.model.visual_tokenizer!r} is not a folder; train one first")
    visual_tokenizer = VisualTokenizer.from_pretrained(cfg.model.visual_tokenizer)
    width = visual_tokenizer.config.llm_width
    h, w, _ = visual_tokenizer.code_shape
    del visual_tokenizer
    planned = []
    for label in compressors:
        compressor = ablation_compressor(label, (h, w), width)
        run_cfg = ablation_config(cfg, compressor, out_dir / label)  # ConfigError for interleaved + compressor
        built = compressor.build(width)
        try:
            built.num_output_tokens(h, w)
        except ValueError as e:
            raise UserError(f"compressor {label!r} cannot take the {h}x{w} grid: {e}") from None
        planned.append((label, compressor, run_cfg))

    images, questions = prefill_questions(cfg, prefill_batch_size)
    device = select_device(cfg.train.device)
    token_ids: list[torch.Tensor] | None = None
    rows: list[AblationRow] = []
    for label, compressor, run_cfg in planned:
        log.info("compressor ablation: training %s (%s)", label, compressor.to_dict())
        result = train_mllm(run_cfg, out_dir=out_dir / label)
        model = UniCodeMLLM.from_pretrained(result.final_dir).to(device).eval()
        if token_ids is None:  # the visual tokenizer is the same in every run: encode the images once
            token_ids = question_prompts_token_ids(model, images)
        prompts = question_prompts(model, token_ids, questions)
        batch = MLLMCollator(model.token_ids.pad, padding_side="left")(prompts)
        prefill = measure_prefill(model, batch, prefill_repeats)
        metrics = result.metrics
        vqa = {s: float(metrics[f"{s}/vqa_exact"]) for s in cfg.eval.splits if f"{s}/vqa_exact" in metrics}
        rows.append(
            AblationRow(
                label=label,
                compressor=compressor.to_dict(),
                tokens_per_image=model.tokens_per_image,
                compressor_parameters=sum(p.numel() for p in model.compressor.parameters()),
                steps=result.steps,
                train_seconds=float(metrics.get("train_seconds", metrics.get("seconds", 0.0))),
                prefill_ms=1000 * prefill,
                vqa_exact=vqa,
                run_dir=str(out_dir / label),
            )
        )
        del model
        _write_outputs(rows, cfg, out_dir, prefill_batch_size=len(questions), prefill_repeats=prefill_repeats)
    return rows


def question_prompts_token_ids(model: UniCodeMLLM, images: Sequence[Any]) -> list[torch.Tensor]:
    """PIL images -> (h, w, d) LLM token ids with the model's visual tokenizer (CPU tensors)."""
    from unicode_mllm.generation.image_inputs import images_to_token_ids

    return [ids for ids in images_to_token_ids(model, list(images)) if ids is not None]


def _write_outputs(
    rows: Sequence[AblationRow], cfg: MLLMTrainConfig, out_dir: Path, *, prefill_batch_size: int, prefill_repeats: int
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = rows_to_markdown(rows, cfg.eval.splits)
    (out_dir / "comparison.md").write_text(table + "\n")
    report = {
        "rows": [r.to_dict() for r in rows],
        "prefill": {"batch_size": prefill_batch_size, "repeats": prefill_repeats, "warmup": 1},
        "config": config_to_dict(cfg),
    }
    (out_dir / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
