"""The evaluations of a finished pipeline run that the demo's report and the ablation's table show: reconstruction
of the visual tokenizer (`evaluate_visual_tokenizer`) and held-out VQA + text-to-image of the MLLM
(`evaluate_mllm`), sized by a profile's `EvalSizes` and `Sampling` (`unicode_mllm/pipeline.py`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unicode_mllm.errors import UserError

if TYPE_CHECKING:
    from unicode_mllm.evaluation import SkipCounts, T2IResult, VQAItem, VQAResult
    from unicode_mllm.pipeline import EvalSizes, Sampling


@dataclass
class TokenizerEvaluation:
    """Reconstruction scores per image set (val, heldout, photos) and the grids written."""

    scores: dict[str, dict[str, Any]]  # set -> {num_images, psnr, ssim, lpips, ...} or {available: False, reason}
    grids: dict[str, Path]


def evaluate_visual_tokenizer(
    tokenizer_dir: Path, data_dir: Path, sizes: EvalSizes, out_dir: Path, device: str | torch.device = "cpu"
) -> TokenizerEvaluation:
    """PSNR/SSIM (LPIPS when a VGG16 trunk is cached) on `tokenizer_images` val and heldout images and
    on the photos of `sizes.photos`; photos that cannot be loaded are reported with the reason."""
    from unicode_mllm.evaluation import ImageSet, eval_visual_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    sets: dict[str, Any] = {split: ImageSet.shards(data_dir, split) for split in ("val", "heldout")}
    if sizes.photos:
        sets["photos"] = ImageSet.photos(sizes.photos)
    scores: dict[str, dict[str, Any]] = {}
    grids: dict[str, Path] = {}
    for name, images in sets.items():
        try:
            result = eval_visual_tokenizer(
                tokenizer_dir,
                images,
                lpips_trunk="auto",
                batch_size=sizes.batch_size,
                limit=sizes.tokenizer_images,
                device=device,
                grid_path=out_dir / f"reconstructions-{name}.png",
                grid_count=8,
            )
        except UserError as exn:  # no scikit-image, or none of its photos load here
            if name != "photos":
                raise
            scores[name] = {"available": False, "reason": str(exn)}
            continue
        report = result.to_dict()
        (out_dir / f"tokenizer-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        scores[name] = {
            "available": True,
            "num_images": result.num_images,
            "psnr": result.psnr,
            "ssim": result.ssim,
            "lpips": result.lpips,
            "lpips_note": result.lpips_note,
            "skipped": report["skipped"],
            "usage_per_depth": [u["distinct"] for u in report["usage"]["per_depth"]],
            "scene_fidelity": report["scene_fidelity"],  # None for the photos
        }
        if result.grid_path is not None:
            grids[name] = result.grid_path
    return TokenizerEvaluation(scores, grids)


def spread_vqa_items(data_dir: Path, split: str, limit: int, per_image: int, skips: SkipCounts) -> list[VQAItem]:
    """At most `per_image` questions of each image of the split, up to `limit` in all, in manifest order.

    Image k contributes its questions (k * per_image + i) mod n, i < per_image, so that every question
    kind comes up across images instead of the first images' questions filling the limit.
    """
    from unicode_mllm.evaluation import shapes_vqa_items

    if limit < 1 or per_image < 1:
        raise ValueError(f"limit and per_image must be >= 1 (got {limit}, {per_image})")
    items: list[VQAItem] = []
    stream = shapes_vqa_items(data_dir, split, skips)
    try:
        groups = itertools.groupby(stream, key=lambda item: item.source.rsplit("#", 1)[0])
        for k, (_, group) in enumerate(groups):
            questions = list(group)
            n = len(questions)
            items += [questions[(k * per_image + i) % n] for i in range(min(per_image, n))]
            if len(items) >= limit:
                break
    finally:
        stream.close()  # the shard reader adds its skip counts when it closes
    return items[:limit]


@dataclass
class MLLMEvaluation:
    """Held-out VQA and text-to-image results of one stage-2 model, with the report's figures."""

    vqa: VQAResult
    t2i: T2IResult
    vqa_gallery: Path
    t2i_grid: Path
    decoding: dict[str, Any]
    sampling: dict[str, Any]

    def metrics(self) -> dict[str, Any]:
        t2i = self.t2i.to_dict()
        return {
            "vqa": {
                "split": self.vqa.source.get("split"),
                "accuracy": self.vqa.accuracy,
                "num_questions": self.vqa.num_questions,
                "per_kind": self.vqa.per_kind(),
                "skipped": self.vqa.skips.to_dict(),
                "decoding": self.decoding,
            },
            "t2i": {"groups": t2i["groups"], "all": t2i["all"], "sampling": self.sampling},
        }


def evaluate_mllm(
    model_dir: Path,
    data_dir: Path,
    sizes: EvalSizes,
    sampling: Sampling,
    out_dir: Path,
    device: str | torch.device = "cpu",
) -> MLLMEvaluation:
    """Greedy VQA on held-out questions (`generation.answer`) and text-to-image on seen and held-out
    instructions (`generation.generate_images`, scored by the shapes analyser); writes the full JSON
    reports and the two figures into `out_dir`."""
    from unicode_mllm.evaluation import SkipCounts, eval_t2i, eval_vqa, shapes_config_from_manifest, shapes_t2i_prompts
    from unicode_mllm.generation import answer, generate_images
    from unicode_mllm.model import UniCodeMLLM
    from unicode_mllm.viz import caption_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    mllm = UniCodeMLLM.from_pretrained(model_dir).to(device).eval()

    # -- VQA: real greedy decoding, questions spread over the held-out images
    skips = SkipCounts()
    items = spread_vqa_items(data_dir, "heldout", sizes.vqa_questions, sizes.vqa_per_image, skips)
    predictions: list[str] = []

    def answer_fn(images: list, questions: list[str]) -> list[str]:
        answers = answer(
            mllm,
            images,
            questions,
            max_new_tokens=sizes.max_answer_tokens,
            temperature=0.0,
            batch_size=sizes.batch_size,
        )
        predictions.extend(answers)
        return answers

    source = {"kind": "shapes", "data_dir": str(data_dir), "split": "heldout", "per_image": sizes.vqa_per_image}
    vqa = eval_vqa(answer_fn, items, batch_size=sizes.batch_size, source=source, skips=skips)
    decoding = {"max_new_tokens": sizes.max_answer_tokens, "temperature": 0.0}
    (out_dir / "vqa.json").write_text(json.dumps({**vqa.to_dict(), "decoding": decoding}, indent=2) + "\n")
    image_of = [item.source.rsplit("#", 1)[0] for item in items]
    shown = [i for i in range(len(items)) if i == 0 or image_of[i - 1] != image_of[i]][: sizes.gallery]  # 1 per image
    captions = [
        f"Q: {items[i].question}\npredicted: {predictions[i] or '(empty)'}\ntrue: {items[i].answers[0]}" for i in shown
    ]
    vqa_gallery = out_dir / "vqa-answers.png"
    caption_grid([items[i].image for i in shown], captions, columns=4, cell_size=128, max_caption_lines=8).save(
        vqa_gallery
    )

    # -- text-to-image: seen and held-out instructions interleaved, so the grid shows both
    shapes_cfg = shapes_config_from_manifest(data_dir)
    prompts = shapes_t2i_prompts(shapes_cfg, sizes.t2i_prompts)
    seen = [p for p in prompts if p.group == "seen"]
    heldout = [p for p in prompts if p.group == "heldout"]
    prompts = [p for pair in zip(seen, heldout, strict=True) for p in pair]
    batch_index = itertools.count()

    def generate_fn(batch_prompts: list[str]) -> list:
        return generate_images(
            mllm,
            batch_prompts,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            cfg_scale=sampling.cfg_scale,
            seed=sampling.seed + next(batch_index),
            batch_size=sizes.batch_size,
        ).images

    t2i_grid = out_dir / "t2i-generations.png"
    t2i = eval_t2i(
        generate_fn, prompts, cfg=shapes_cfg, batch_size=sizes.batch_size, grid_path=t2i_grid, grid_count=sizes.gallery
    )
    sampling_dict = {**dataclasses.asdict(sampling), "batch_size": sizes.batch_size}
    (out_dir / "t2i.json").write_text(json.dumps({**t2i.to_dict(), "sampling": sampling_dict}, indent=2) + "\n")
    return MLLMEvaluation(vqa, t2i, vqa_gallery, t2i_grid, decoding, sampling_dict)
