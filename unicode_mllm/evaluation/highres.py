"""High-resolution check: small objects in images `scale` x the tokenizer's size, read through three paths.

    rows = run_highres_check("runs/mllm/tiny/final", HighResConfig(steps=200), out_dir="runs/highres")

Data: shapes-world scenes (`train` split to fine-tune, `val`/`heldout` to score) with every object made
`small` (the world's smaller size: 0.48 of a cell) and rendered at `scale * image_size` px; at the tiny
preset's 32 px that is 64 px images whose objects shrink to ~5 px when downscaled to 32. Questions come
from the modified scene (the world's own `questions`); `size` questions are left out, since every object is
small.

Paths (one `ViewGenerator` each, view_size = the tokenizer's image size, view_grid = its (h, w), width = the
LM's; options in `highres_view_generator`):
- `single`: the image downscaled to the base size (bicubic), one view: the model's ordinary reading;
- `s2`: S^2 token mode, scales (1, scale): the base view plus scale^2 native-resolution tiles, merged and
  area-pooled to the base grid; 2 h*w tokens at scale 2;
- `inf_llava`: INF-LLaVA with n = scale: n^2 local tiles + n^2 strided sub-images fused by the (trainable)
  DEM, averaged with the base view; h*w tokens.
Every view is encoded once by the frozen visual tokenizer into (h, w, d) LLM token ids; at every forward
pass the LM's *current* embedding table sums them per view (`UniCodeMLLM.embed_images`), the generator
fuses the views (`ViewGenerator.fuse`), the model's compressor runs per output grid and the result is
spliced over a span of exactly that many tokens (`ViewReadingModel`).

Budget: every path starts from the same saved model and fine-tunes on the same single-turn VQA samples in
the same order (seeded) for `steps` AdamW steps at `lr` (the LM, the DEM, a trainable compressor), then is
scored teacher-forced (`stages/mllm/eval_set.py`: greedy exact match) before and after fine-tuning.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unicode_mllm.addons.highres import ViewGenerator, ViewGeneratorConfig, compress_view_features
from unicode_mllm.data.conversation import get_template
from unicode_mllm.data.image_io import pil_to_tensor
from unicode_mllm.data.mllm_samples import MODEL_INPUTS, MLLMCollator, MLLMSample, MLLMSampleBuilder
from unicode_mllm.data.shapes import ShapesConfig, ShapesWorld
from unicode_mllm.data.shapes.language import questions
from unicode_mllm.data.shapes.render import render_scene
from unicode_mllm.errors import UserError
from unicode_mllm.model.mllm import UniCodeMLLM
from unicode_mllm.runtime.seeding import seed_everything
from unicode_mllm.stages.mllm.eval_set import EvalSample, evaluate_teacher_forced, token_losses

log = logging.getLogger(__name__)

HIGHRES_PATHS: tuple[str, ...] = ("single", "s2", "inf_llava")
SMALL = "small"


@dataclass(frozen=True)
class HighResConfig:
    """Settings of `run_highres_check` (see the module docstring)."""

    paths: tuple[str, ...] = HIGHRES_PATHS
    scale: int = 2  # image side = scale * the visual tokenizer's image size
    train_records: int = 200
    eval_records: int = 50
    eval_splits: tuple[str, ...] = ("val", "heldout")
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 16
    grad_clip: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        unknown = sorted(set(self.paths) - set(HIGHRES_PATHS))
        if unknown or not self.paths:
            raise UserError(f"high-res paths {unknown or '[]'} are unknown; choose from {list(HIGHRES_PATHS)}")
        for name in ("scale", "train_records", "eval_records", "batch_size"):
            value = getattr(self, name)
            if value < 1 or (name == "scale" and value < 2):
                raise UserError(f"high-res check: {name} must be >= {2 if name == 'scale' else 1}, got {value}")
        if self.steps < 0 or self.lr < 0:
            raise UserError(f"high-res check: steps and lr must be >= 0, got {self.steps} and {self.lr}")
        if not self.eval_splits:
            raise UserError("high-res check: eval_splits is empty")


@dataclass
class HighResRecord:
    """One high-resolution image (3, H, W) in [-1, 1] and its (question, answer, kind) triples."""

    id: str
    pixel_values: Tensor
    qa: list[tuple[str, str, str]]


def small_object_records(
    split: str, count: int, image_size: int, *, start: int = 0, shapes: ShapesConfig | None = None
) -> list[HighResRecord]:
    """`count` scenes of `split` of the shapes world `shapes` with every object `small`, at `image_size` px.

    The scene (objects, cells, colours, background) is the world's own sample; only the size changes, and the
    questions are asked of the changed scene, without `size` questions. `image_size` may exceed the world's
    own range (the scene does not depend on it).
    """
    world = ShapesWorld(shapes or ShapesConfig())
    pairs = world.all_pairs if split == "heldout" else world.train_pairs
    records = []
    for index in range(start, start + count):
        rng = world.rng(split, index)
        scene = world.sample_scene(split, index, rng)
        # The offset was drawn inside the margin of the original size; a small object's margin is wider.
        scene = replace(scene, objects=tuple(replace(o, size=SMALL) for o in scene.objects))
        qa = [
            (q.question, q.answer, q.kind) for q in questions(scene, rng, world.cfg.shapes, pairs) if q.kind != "size"
        ]
        image = render_scene(scene, image_size)
        records.append(HighResRecord(f"{split}-{index:06d}", pil_to_tensor(image), qa))
    return records


def _heads(width: int) -> int:
    return next(h for h in (8, 4, 2, 1) if width % h == 0)


def highres_view_generator(path: str, scale: int, width: int) -> ViewGeneratorConfig:
    """The view generator of a path for images `scale` x the base size and an LM of `width`."""
    if path == "single":
        return ViewGeneratorConfig("single")
    if path == "s2":
        return ViewGeneratorConfig("s2", {"scales": (1, scale), "merge": "token"})
    if path == "inf_llava":
        return ViewGeneratorConfig("inf_llava", {"n": scale, "num_heads": _heads(width)})
    raise UserError(f"high-res path {path!r} is unknown; choose from {list(HIGHRES_PATHS)}")


class ViewReadingModel(nn.Module):
    """A UniCodeMLLM that reads each image as `generator`'s views: `forward` takes UniCodeMLLM's inputs with
    every read image given as its v views' (h, w, d) token ids, view-major per image ((n*v, h, w, d) in all).

    The generator is a submodule (INF-LLaVA's DEM trains with the LM). Raises UserError for interleaved reading
    or a generator whose output width the model's compressor does not take.
    """

    def __init__(self, model: UniCodeMLLM, generator: ViewGenerator):
        super().__init__()
        if model.reading != "aggregated":
            raise UserError(
                f"view generators read summed code embeddings: reading must be 'aggregated', got {model.reading!r}"
            )
        if generator.out_width() != model.compressor.in_width:
            raise UserError(
                f"view generator {generator.name!r} returns {generator.out_width()}-wide tokens but compressor "
                f"{model.read_hook.compressor_config.name!r} reads {model.compressor.in_width}; use S^2 "
                "merge='token' or a compressor with a matching input_width"
            )
        self.model = model
        self.generator = generator

    @property
    def visual_tokenizer(self) -> Any:
        return self.model.visual_tokenizer

    @property
    def num_views(self) -> int:
        return self.generator.num_views()

    @property
    def tokens_per_image(self) -> int:
        """Tokens one image is read as: the compressor's output summed over the generator's output grids."""
        return sum(self.model.compressor.num_output_tokens(h, w) for h, w in self.generator.output_grids())

    def train(self, mode: bool = True) -> ViewReadingModel:
        super().train(mode)
        self.model.visual_tokenizer.eval()  # frozen, as in UniCodeMLLM.train
        return self

    @torch.no_grad()
    def encode_views(self, pixel_values: Tensor) -> Tensor:
        """(b, 3, H, W) images in [-1, 1] -> (b, v, h, w, d) LLM token ids of their views (frozen tokenizer)."""
        views = self.generator.make_views(pixel_values)  # (v, b, 3, vh, vw)
        v, b = views.shape[:2]
        token_ids = self.model.encode_images(views.flatten(0, 1))  # (v*b, h, w, d)
        return token_ids.unflatten(0, (v, b)).transpose(0, 1)

    def read_views(self, view_token_ids: Tensor) -> Tensor:
        """(n*v, h, w, d) token ids, view-major per image -> (n, m, c) tokens the LM reads, m = tokens_per_image."""
        v = self.num_views
        if view_token_ids.shape[0] % v:
            raise ValueError(f"{view_token_ids.shape[0]} view grids are not a multiple of the {v} views per image")
        embeds = self.model.embed_images(view_token_ids)  # (n*v, h*w, c), the LM's current embedding rows
        embeds = embeds.unflatten(0, (-1, v)).transpose(0, 1)  # (v, n, h*w, c)
        compressed = compress_view_features(self.model.compressor, self.generator.fuse(embeds))
        return compressed.tokens

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        image_token_ids: Tensor | None = None,
        images_per_sample: Tensor | None = None,
        image_is_uncompressed: Tensor | None = None,
        **lm_kwargs: Any,
    ) -> Any:
        """UniCodeMLLM.forward with images read through the views; `image_is_uncompressed` is ignored (no
        decompression samples here). images_per_sample counts view grids (v per image)."""
        image_embeds = None
        per_sample = None
        if image_token_ids is not None and image_token_ids.shape[0] > 0:
            image_embeds = self.read_views(image_token_ids.to(input_ids.device))
            if images_per_sample is not None:
                per_sample = images_per_sample // self.num_views
        spliced = self.model.splice_image_embeds(input_ids, image_embeds, attention_mask, per_sample)
        return self.model.forward_spliced(spliced, labels, **lm_kwargs)


def build_view_samples(
    reader: ViewReadingModel, records: Sequence[HighResRecord], split: str, *, encode_batch: int = 16
) -> list[EvalSample]:
    """One single-turn VQA sample per question, each image given as its views' token ids (v, h, w, d)."""
    model = reader.model
    builder = MLLMSampleBuilder(
        model.text_tokenizer,
        model.code_shape,
        template=model.template,
        reading=model.reading,
        max_length=1 << 30,
        strict=True,
        read_tokens_per_image=reader.tokens_per_image,
    )
    device = next(model.visual_tokenizer.parameters()).device
    samples: list[EvalSample] = []
    for start in range(0, len(records), encode_batch):
        chunk = records[start : start + encode_batch]
        pixels = torch.stack([r.pixel_values for r in chunk]).to(device)
        view_ids = reader.encode_views(pixels).cpu()  # (b, v, h, w, d)
        for record, ids in zip(chunk, view_ids, strict=True):
            for question, answer, kind in record.qa:
                sample = builder.vqa(ids[0], [(question, answer)], record.id)
                # The builder lays out one span of tokens_per_image slots; the model reads it from all v views.
                sample = replace(
                    sample, image_token_ids=ids, image_is_uncompressed=torch.zeros(ids.shape[0], dtype=torch.bool)
                )
                samples.append(EvalSample(sample, split, kind))
    return samples


def finetune_view_reader(
    reader: ViewReadingModel, samples: Sequence[MLLMSample], cfg: HighResConfig, device: torch.device
) -> dict[str, float]:
    """`cfg.steps` AdamW steps on batches of `cfg.batch_size` samples (seeded order); returns time and last loss."""
    params = [p for p in reader.parameters() if p.requires_grad]
    if cfg.steps == 0 or not samples:
        return {"train_seconds": 0.0, "last_loss": float("nan")}
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    collator = MLLMCollator(pad_token_id=reader.model.token_ids.pad)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    reader.train()
    started = time.perf_counter()
    loss_value = float("nan")
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(samples)))
            rng.shuffle(fresh)
            order += fresh
        picked, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = collator([samples[i] for i in picked])
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k != "labels"}
        labels = batch["labels"].to(device)
        logits = reader(**inputs).logits  # (b, t, V)
        losses, mask = token_losses(logits, labels)
        loss = losses.sum() / mask.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        loss_value = float(loss.detach())
    reader.eval()
    return {"train_seconds": round(time.perf_counter() - started, 2), "last_loss": loss_value}


@dataclass
class HighResRow:
    path: str
    view_generator: dict[str, Any]
    views_per_image: int
    tokens_per_image: int
    generator_parameters: int
    train_seconds: float
    before: dict[str, float] = field(default_factory=dict)  # split -> VQA exact before fine-tuning
    after: dict[str, float] = field(default_factory=dict)  # split -> VQA exact after fine-tuning
    per_kind: dict[str, float] = field(default_factory=dict)  # "{split}/vqa_exact_{kind}" after fine-tuning

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def reply_end_ids(model: UniCodeMLLM) -> set[int]:
    """eos, and the template's end of a non-final reply when it is one token: what ends greedy decoding
    (the same rule as `MLLMTrainer.reply_end_ids`, so scores match the trainer's)."""
    ends = {int(model.text_tokenizer.eos_token_id)}
    separator = model.text_tokenizer.encode(get_template(model.template).assistant_end, add_special_tokens=False)
    if len(separator) == 1:
        ends.add(int(separator[0]))
    return ends


def _vqa(metrics: dict[str, float], splits: Sequence[str]) -> dict[str, float]:
    return {s: metrics[f"{s}/vqa_exact"] for s in splits if f"{s}/vqa_exact" in metrics}


def run_highres_path(
    model_dir: str | Path,
    path: str,
    cfg: HighResConfig,
    train_records: Sequence[HighResRecord],
    eval_records: dict[str, Sequence[HighResRecord]],
    device: torch.device,
) -> HighResRow:
    """Load the model, read through `path`'s views, score, fine-tune for cfg.steps, score again."""
    seed_everything(cfg.seed)  # the same start for every path (the DEM's init draws from it)
    model = UniCodeMLLM.from_pretrained(model_dir)
    h, w, _ = model.code_shape
    size = model.visual_tokenizer.config.image_size
    width = model.lm.get_input_embeddings().weight.shape[1]
    gen_cfg = highres_view_generator(path, cfg.scale, width)
    generator = gen_cfg.build(view_size=(size, size), view_grid=(h, w), width=width)
    reader = ViewReadingModel(model, generator).to(device).eval()
    train_samples = [s.sample for s in build_view_samples(reader, train_records, "train")]
    eval_samples = [s for split, recs in eval_records.items() for s in build_view_samples(reader, recs, split)]
    collator = MLLMCollator(pad_token_id=model.token_ids.pad)
    scoring = {"batch_size": cfg.batch_size, "device": device, "reply_end_ids": reply_end_ids(model)}
    before = evaluate_teacher_forced(reader, eval_samples, collator, **scoring)
    log.info("high-res %s: %d train samples, %d eval samples", path, len(train_samples), len(eval_samples))
    timing = finetune_view_reader(reader, train_samples, cfg, device)
    after = evaluate_teacher_forced(reader, eval_samples, collator, **scoring)
    return HighResRow(
        path=path,
        view_generator=gen_cfg.to_dict(),
        views_per_image=reader.num_views,
        tokens_per_image=reader.tokens_per_image,
        generator_parameters=sum(p.numel() for p in generator.parameters()),
        train_seconds=timing["train_seconds"],
        before=_vqa(before, cfg.eval_splits),
        after=_vqa(after, cfg.eval_splits),
        per_kind={k: v for k, v in after.items() if "/vqa_exact_" in k},
    )


def rows_to_markdown(rows: Sequence[HighResRow], splits: Sequence[str], steps: int) -> str:
    head = ["path", "views/image", "tokens/image", "params", "train s"]
    head += [f"{s} VQA before" for s in splits] + [f"{s} VQA after {steps} steps" for s in splits]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.path, str(r.views_per_image), str(r.tokens_per_image), f"{r.generator_parameters:,}"]
        cells.append(f"{r.train_seconds:.1f}")
        cells += [f"{100 * r.before[s]:.1f}%" if s in r.before else "-" for s in splits]
        cells += [f"{100 * r.after[s]:.1f}%" if s in r.after else "-" for s in splits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_highres_check(
    model_dir: str | Path,
    cfg: HighResConfig,
    *,
    shapes: ShapesConfig | None = None,
    out_dir: str | Path | None = None,
    device: Any = "cpu",
) -> list[HighResRow]:
    """Compare the paths of `cfg.paths` on small-object images at `cfg.scale` x the base size (module docstring).

    shapes: the world the model was trained on (vocabulary, held-out pairs; `shapes_config_from_manifest` of
    its shards), default `ShapesConfig()`. Writes OUT/highres.md and OUT/highres.json when out_dir is given.
    Raises UserError for bad settings or a folder that is not a saved UniCodeMLLM.
    """
    cfg.validate()
    device = torch.device(device)
    probe = UniCodeMLLM.from_pretrained(model_dir)
    image_size = cfg.scale * probe.visual_tokenizer.config.image_size
    del probe
    train_records = small_object_records("train", cfg.train_records, image_size, shapes=shapes)
    eval_records = {
        split: small_object_records(split, cfg.eval_records, image_size, shapes=shapes) for split in cfg.eval_splits
    }
    rows = []
    for path in cfg.paths:
        rows.append(run_highres_path(model_dir, path, cfg, train_records, eval_records, device))
        if out_dir is not None:
            _write_outputs(rows, cfg, Path(out_dir), model_dir, image_size)
    return rows


def _write_outputs(
    rows: Sequence[HighResRow], cfg: HighResConfig, out_dir: Path, model_dir: str | Path, image_size: int
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "highres.md").write_text(rows_to_markdown(rows, cfg.eval_splits, cfg.steps) + "\n")
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}
    report = {
        "model": str(model_dir),
        "image_size": image_size,
        "settings": settings,
        "rows": [r.to_dict() for r in rows],
    }
    (out_dir / "highres.json").write_text(json.dumps(report, indent=2) + "\n")
