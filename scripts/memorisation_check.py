"""Memorisation check of the whole pipeline: stage 2 trained on a few shapes images (all tasks) must answer their
questions and redraw them. On exactly those images it measures, for the writing path:

- teacher-forced next-code accuracy of their text-to-image samples (the codes the training target holds, argmax
  among the code ids, as the constrained decoder chooses);
- greedy redraws (`generate_images`, temperature 0, no guidance): codes equal to the training codes, and the
  first step at which the redraw leaves the training sequence;
- agreement of the cached greedy decoding with a full forward over the same prefix (a train/inference mismatch
  on the writing path, positions, prompt layout or cache, would show as disagreement);
- the scene kept (shapes analyser, whole scene right) by the redraws, beside the tokenizer's own reconstruction
  of the same images (the ceiling) and by the teacher-forced codes decoded;
- greedy VQA on the images' questions.

    python scripts/memorisation_check.py --lm outputs/demo/lm/model --tokenizer outputs/demo/tokenizer/final \
        --out runs/memorise16 --images 16 --steps 360 --threads 2

Trains `configs/mllm/tiny.yaml` (data.shards = the images, eval off) unless OUT/run/final exists; writes
OUT/report.json and OUT/redraws.png (original | tokenizer reconstruction | greedy redraw, per image). The
per-image measurements are `unicode_mllm/evaluation/writing_path.py`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from unicode_mllm.config import load_config
from unicode_mllm.data.image_io import pil_to_tensor, tensor_to_pil
from unicode_mllm.data.shapes import ShapesConfig, ShapesWorld, score
from unicode_mllm.data.shapes_dataset import write_shapes_dataset
from unicode_mllm.evaluation.answers import is_correct
from unicode_mllm.evaluation.writing_path import measure_writing_path
from unicode_mllm.generation import answer
from unicode_mllm.generation.image_generation import decode_token_ids
from unicode_mllm.model import UniCodeMLLM
from unicode_mllm.stages.mllm import MLLMTrainConfig, train_mllm
from unicode_mllm.viz import caption_grid


def train(args: argparse.Namespace, data: Path, run: Path) -> Path:
    if (run / "final").is_dir():
        return run / "final"
    overrides = [
        f"model.lm={args.lm}",
        f"model.visual_tokenizer={args.tokenizer}",
        f"data.shards={data}",
        f"train.steps={args.steps}",
        f"train.out_dir={run}",
        f"train.seed={args.seed}",
        f"train.num_threads={args.threads}",
        "train.max_minutes=null",
        f"train.eval_every={args.steps}",
        f"train.ckpt_every={args.steps}",
        "eval.splits=[]",
        f"data.records_per_batch={min(8, args.images)}",
    ]
    cfg = load_config(MLLMTrainConfig, "configs/mllm/tiny.yaml", overrides)
    return train_mllm(cfg).final_dir


def mean_of(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=360)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data, run = args.out / "data", args.out / "run"
    image_size = json.loads((Path(args.tokenizer) / "config.json").read_text())["image_size"]
    shapes = ShapesConfig(image_size=image_size)
    if not (data / "manifest.json").is_file():
        write_shapes_dataset(shapes, data, {"train": args.images}, shard_size=args.images)
    model = UniCodeMLLM.from_pretrained(str(train(args, data, run))).eval()
    vt = model.visual_tokenizer
    rows, tiles = [], []
    for sample in ShapesWorld(shapes).iter_split("train", args.images):
        pixels = pil_to_tensor(sample.image)[None]  # (1, 3, H, W)
        target = vt.codes_to_token_ids(vt.encode(pixels))[0]  # (h, w, d)
        path = measure_writing_path(model, sample.instruction, target)
        shape = model.code_shape
        images = decode_token_ids(model, torch.stack([target, path.forced.reshape(shape), path.greedy.reshape(shape)]))
        recon, forced_image, redraw = (tensor_to_pil(x) for x in images)
        answers = answer(model, [sample.image] * len(sample.qa), [q.question for q in sample.qa], max_new_tokens=8)
        row = {
            "id": sample.id,
            "instruction": sample.instruction,
            **path.summary(),
            "scene_kept_reconstruction": bool(score(recon, sample.scene, shapes).overall),
            "scene_kept_teacher_forced": bool(score(forced_image, sample.scene, shapes).overall),
            "scene_kept_greedy_redraw": bool(score(redraw, sample.scene, shapes).overall),
            "vqa_correct": sum(is_correct(a, [q.answer]) for a, q in zip(answers, sample.qa, strict=True)),
            "vqa_questions": len(sample.qa),
        }
        rows.append(row)
        departure = f"greedy, leaves at {row['greedy_first_departure']}"
        tiles += [(sample.image, "original"), (recon, "tokenizer"), (redraw, departure)]
        print(json.dumps({k: v for k, v in row.items() if k != "instruction"}), file=sys.stderr)
    n = len(rows)
    summary = {
        "images": n,
        "steps": args.steps,
        "seed": args.seed,
        "teacher_forced_code_accuracy": sum(r["teacher_forced_code_accuracy"] for r in rows) / n,
        "greedy_codes_equal_to_target": sum(r["greedy_codes_equal_to_target"] for r in rows) / n,
        "greedy_first_departure_median": sorted(r["greedy_first_departure"] for r in rows)[n // 2],
        "cached_vs_full_forward_agreement": sum(r["cached_vs_full_forward_agreement"] for r in rows) / n,
        "greedy_codes_equal_after_departure": mean_of(r["greedy_codes_equal_after_departure"] for r in rows),
        "scene_kept_reconstruction": sum(r["scene_kept_reconstruction"] for r in rows) / n,
        "scene_kept_teacher_forced": sum(r["scene_kept_teacher_forced"] for r in rows) / n,
        "scene_kept_greedy_redraw": sum(r["scene_kept_greedy_redraw"] for r in rows) / n,
        "vqa": sum(r["vqa_correct"] for r in rows) / sum(r["vqa_questions"] for r in rows),
        "span": model.num_write_tokens,
    }
    (args.out / "report.json").write_text(json.dumps({"summary": summary, "images": rows}, indent=2))
    caption_grid([t for t, _ in tiles], [c for _, c in tiles], columns=3).save(args.out / "redraws.png")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
