"""Does a stage-2 model name the shape of a held-out colour+shape pair, or only shapes seen with that colour?

Asks "What shape is the <colour> object?" about every held-out-pair object of the first `--images` held-out
images whose colour is unique in its scene, answers greedily, and counts the answers: right, a shape that
training paired with that colour, another shape, or not a shape. RESULTS.md ("How far more stage-2 steps
go") has the command and the figure.

    python scripts/heldout_pair_answers.py --model runs/mllm/hq_3k/final
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from unicode_mllm.data.shapes import ShapesConfig, ShapesWorld
from unicode_mllm.generation import answer
from unicode_mllm.model.mllm import UniCodeMLLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="UniCodeMLLM folder (save_pretrained output)")
    parser.add_argument("--images", type=int, default=150, help="held-out images to ask about")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = UniCodeMLLM.from_pretrained(args.model).eval()
    world = ShapesWorld(ShapesConfig(image_size=model.visual_tokenizer.config.image_size))
    train_pairs, held_out = set(world.train_pairs), set(world.held_out_pairs)
    images, questions, truths = [], [], []
    for index in range(args.images):
        sample = world.sample("heldout", index)
        colours = Counter(o.colour for o in sample.scene.objects)
        for obj in sample.scene.objects:
            if (obj.colour, obj.shape) in held_out and colours[obj.colour] == 1:
                images.append(sample.image)
                questions.append(f"What shape is the {obj.colour} object?")
                truths.append((obj.colour, obj.shape))
    answers = answer(model, images, questions, max_new_tokens=4, batch_size=32)
    counts: Counter[str] = Counter()
    for (colour, shape), reply in zip(truths, answers, strict=True):
        word = (reply.split() or [""])[0]
        if word == shape:
            counts["right (the held-out shape)"] += 1
        elif (colour, word) in train_pairs:
            counts["a shape training paired with this colour"] += 1
        elif word in world.cfg.shapes:
            counts["another shape"] += 1
        else:
            counts["not a shape"] += 1
    print(f"{len(questions)} questions about held-out-pair objects: {dict(counts)}")


if __name__ == "__main__":
    main()
