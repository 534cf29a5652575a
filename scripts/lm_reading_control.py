"""Control experiment: how fast does the tiny LM learn colour / shape / position questions from image tokens?

Fine-tunes the stage-0 LM on single-turn "What colour is the <shape>?", "What shape is the <colour>
object?" and "Where is the <colour> <shape>?" questions about shapes images (scored on the answer's first
token), with the 64 image tokens given either as

- `codes`: the visual tokenizer's aggregated code embeddings (the LM's own embedding rows, summed per
  top-grid position; what stage 2 reads), or
- `pixels`: the image cut into 8x8 patches (4x4 pixels at 32 px), each mapped by a learned linear layer
  (no tokenizer at all: an upper bound on what the codes could offer), or
- `random_rows`: as `codes`, with the code rows re-drawn at random (tests whether the rows' word
  meanings get in the way).

Options isolate one factor each: `--max-objects 1 --kinds shape` (recognition without binding),
`--image-size` (codes of a larger image come on a larger grid: the tokenizer is convolutional), `--grid`
(pixels: patches per side, 4 = 16 tokens of 8x8 px at 32 px), `--cell-bags` (codes: one token per 3x3 world
cell, the mean of its aggregated embeddings), `--image-positions` (a learned embedding per grid cell), `--local-mixer`
(a learned 3x3 convolution of the token grid), `--question-first` (the question before the image, so
each image token is read knowing what is asked), `--drop-background` (codes: read only positions whose code
stack is not the image's most common one), `--reinit` (a random LM; `--hidden-size` / `--layers` change
its size), `--attention-gain` (sharper attention at the start). Prints validation and training accuracy
(overall and per kind) every `--eval-every` steps. RESULTS.md ("Stage 2 with the hq tokenizer, and why VQA
stalls" and "Why the tiny LM does not learn shapes") has the commands and the figures. Runs on CPU in minutes.

    python scripts/lm_reading_control.py --variant pixels --steps 2000 \
        --lm runs/lm/tiny/model --tokenizer outputs/demo_hq/tokenizer/final
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from unicode_mllm.data.shapes import ShapesConfig, ShapesWorld
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

KINDS = ("colour", "shape", "position")
GRID = 8  # pixel patches per side by default: the same 64 tokens as the codes (4x4-pixel patches at 32 px)


def load_split(world, tokenizer, split: str, count: int, kinds: tuple[str, ...], grid: int = GRID):
    """(images (n, 3, H, W) in [-1, 1], token ids (n, h, w, d) (zeros (n, grid, grid, 1) without a tokenizer),
    per image its (question, answer, kind) of the given kinds)."""
    images, questions = [], []
    for index in range(count):
        sample = world.sample(split, index)
        images.append(np.asarray(sample.image))
        questions.append([(q.question, q.answer, q.kind) for q in sample.qa if q.kind in kinds])
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if tokenizer is None:
        return x, torch.zeros(count, grid, grid, 1, dtype=torch.long), questions
    with torch.no_grad():
        # any_size: the convolutional encoder codes larger images too (on a larger grid).
        codes = [tokenizer.encode(x[b : b + 256], any_size=True) for b in range(0, count, 256)]
        ids = tokenizer.codes_to_token_ids(torch.cat(codes))
    return x, ids, questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=["codes", "pixels", "random_rows"], required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lm", default="runs/lm/tiny/model")
    parser.add_argument("--tokenizer", default="runs/tokenizer/tiny/final")
    parser.add_argument(
        "--image-size", type=int, default=None, help="pixels variant only: image side (default: the tokenizer's)"
    )
    parser.add_argument(
        "--grid", type=int, default=GRID, help="pixels variant only: patches per side (8: 64 tokens; 4: 16 tokens)"
    )
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--drop-background",
        action="store_true",
        help="codes only: read only the positions whose codes differ from the image's most common code stack",
    )
    parser.add_argument(
        "--attention-gain", type=float, default=1.0, help="multiply every layer's q_proj by this (sharper attention)"
    )
    parser.add_argument("--reinit", action="store_true", help="start from a random LM of the same architecture")
    parser.add_argument(
        "--hidden-size", type=int, default=None, help="a random LM of this width (heads of 32; implies --reinit)"
    )
    parser.add_argument("--layers", type=int, default=None, help="a random LM of this depth (implies --reinit)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="question kinds, comma-separated")
    parser.add_argument("--max-objects", type=int, default=3, help="most objects per image (1 isolates recognition)")
    parser.add_argument(
        "--local-mixer",
        choices=["none", "linear", "conv2"],
        default="none",
        help="add to each token a learned 3x3 convolution of the token grid (linear) or two with a GELU (conv2)",
    )
    parser.add_argument(
        "--cell-bags",
        action="store_true",
        help="codes only: one token per 3x3 world cell, the mean of its positions' aggregated code embeddings "
        "(needs a code grid divisible by 3, e.g. --image-size 48)",
    )
    parser.add_argument(
        "--image-positions", action="store_true", help="add a learned embedding of each image token's grid cell"
    )
    parser.add_argument(
        "--aggregate",
        choices=["sum", "mean", "rolled", "interleaved", "spatial"],
        default="sum",
        help="codes: sum the D embeddings per position (the design), average them (text-token scale), sum them with "
        "slot k's channels rolled by k*width/D (keeps which slot a code is in), read all h*w*D codes as tokens "
        "(interleaved), or (hq) the four bottom codes at their places on the 2h x 2w grid, each plus its top code",
    )
    parser.add_argument(
        "--question-first",
        action="store_true",
        help="put the question before the image tokens (causal attention lets each image token see the question)",
    )
    args = parser.parse_args()

    kinds = tuple(args.kinds.split(","))
    if args.drop_background and args.variant == "pixels":
        parser.error("--drop-background needs code ids: use --variant codes or random_rows")
    if args.grid != GRID and args.variant != "pixels":
        parser.error("--grid applies to --variant pixels only (codes use the tokenizer's grid)")
    if args.cell_bags and args.variant == "pixels":
        parser.error("--cell-bags needs code ids: use --variant codes or random_rows")
    if args.cell_bags and (args.local_mixer != "none" or args.drop_background):
        parser.error("--cell-bags reads 9 cell tokens: it does not combine with --local-mixer or --drop-background")
    reshaped = args.aggregate in ("interleaved", "spatial")
    if reshaped and (args.cell_bags or args.local_mixer != "none" or args.drop_background or args.image_positions):
        parser.error(f"--aggregate {args.aggregate} changes the token grid: use it without the grid options")
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(args.threads)
    lm = AutoModelForCausalLM.from_pretrained(args.lm)
    if args.hidden_size or args.layers:
        config = lm.config
        if args.hidden_size:
            config.hidden_size = args.hidden_size
            config.intermediate_size = 3 * args.hidden_size
            config.num_attention_heads = config.num_key_value_heads = args.hidden_size // 32
            config.head_dim = 32
        if args.layers:
            config.num_hidden_layers = args.layers
        args.reinit = True
    if args.reinit:
        lm = AutoModelForCausalLM.from_config(lm.config)
        print(f"random LM: {sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M parameters", flush=True)
    if args.attention_gain != 1.0:
        with torch.no_grad():
            for layer in lm.model.layers:
                layer.self_attn.q_proj.weight.mul_(args.attention_gain)
    text = AutoTokenizer.from_pretrained(args.lm)
    if args.variant == "pixels" and args.image_size is not None:
        tokenizer, image_size = None, args.image_size
    else:
        # The tokenizer is convolutional: codes of a larger image come on a proportionally larger grid.
        tokenizer = VisualTokenizer.from_pretrained(args.tokenizer).eval()
        image_size = args.image_size or tokenizer.config.image_size
    if args.grid != GRID:
        tokenizer = None  # pixels only: the codes' grid is the tokenizer's, so no ids are needed
    if image_size % args.grid:
        parser.error(f"--grid {args.grid} does not divide the image side {image_size}")
    patch = image_size // args.grid
    world = ShapesWorld(ShapesConfig(image_size=image_size, max_objects=args.max_objects))
    x_train, ids_train, qa_train = load_split(world, tokenizer, "train", args.train_images, kinds, args.grid)
    x_val, ids_val, qa_val = load_split(world, tokenizer, "val", args.val_images, kinds, args.grid)
    embedding = lm.get_input_embeddings()
    width = embedding.weight.shape[1]
    if args.variant == "random_rows":
        with torch.no_grad():
            used = ids_train.unique()
            embedding.weight[used] = torch.randn(len(used), width) * embedding.weight.std()
    patch_proj = nn.Linear(3 * patch * patch, width)
    if args.cell_bags and ids_train.shape[1] % 3:
        parser.error(f"--cell-bags needs a code grid divisible by 3; got {ids_train.shape[1]} (try --image-size 48)")
    grid_cells = 9 if args.cell_bags else ids_train.shape[1] * ids_train.shape[2]
    cell_embedding = nn.Parameter(torch.zeros(grid_cells, width))
    local_mixer = nn.Sequential()
    if args.local_mixer != "none":
        local_mixer.append(nn.Conv2d(width, width, 3, padding=1))
        if args.local_mixer == "conv2":
            local_mixer.extend([nn.GELU(), nn.Conv2d(width, width, 3, padding=1)])
        nn.init.zeros_(local_mixer[-1].weight)  # starts as the plain reading
        nn.init.zeros_(local_mixer[-1].bias)

    def image_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if args.variant == "pixels":
            patches = x.unfold(2, patch, patch).unfold(3, patch, patch)  # (b, 3, grid, grid, p, p)
            patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], -1, 3 * patch * patch)
            tokens = patch_proj(patches)  # (b, grid*grid, width)
        else:
            per_code = embedding(ids)  # (b, h, w, d, width)
            b, h, w, d, _ = per_code.shape
            if args.aggregate == "interleaved":  # (b, h, w*d, width): raster order, depth-first per position
                tokens = per_code.reshape(b, h, w * d, width)
            elif args.aggregate == "spatial":  # hq: (b, 2h, 2w, width), each bottom code at its place + its top code
                bottom = per_code[:, :, :, 1:].reshape(b, h, w, 2, 2, width).permute(0, 1, 3, 2, 4, 5)
                top = per_code[:, :, :, 0].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
                tokens = bottom.reshape(b, 2 * h, 2 * w, width) + top
            elif args.aggregate == "rolled":
                tokens = sum(torch.roll(per_code[:, :, :, k], shifts=k * width // d, dims=-1) for k in range(d))
            else:
                tokens = per_code.sum(dim=3)  # (b, h, w, width): the aggregated reading
                if args.aggregate == "mean":
                    tokens = tokens / d
            if args.cell_bags:  # (b, 3, h/3, 3, w/3, width) -> one mean per world cell
                b, h, w, _ = tokens.shape
                tokens = tokens.reshape(b, 3, h // 3, 3, w // 3, width).mean(dim=(2, 4))
            tokens = tokens.flatten(1, 2)  # (b, tokens, width)
        if args.local_mixer != "none":
            side = ids.shape[1]
            grid = tokens.transpose(1, 2).reshape(tokens.shape[0], width, side, side)
            tokens = tokens + local_mixer(grid).flatten(2).transpose(1, 2)
        return tokens + cell_embedding if args.image_positions else tokens

    def foreground(ids: torch.Tensor) -> list[torch.Tensor]:
        """(b, h, w, d) ids -> per image a (h*w,) bool mask of positions whose code stack is not the most common."""
        stacks = ids.flatten(1, 2)  # (b, h*w, d)
        masks = []
        for image in stacks:
            _, inverse, counts = image.unique(dim=0, return_inverse=True, return_counts=True)
            keep = inverse != counts.argmax()
            masks.append(keep if bool(keep.any()) else torch.ones_like(keep))
        return masks

    def batch(x, ids, qa, indices):
        rows, images, kinds = [], [], []
        for i in indices:
            if qa[i]:
                question, answer, kind = random.choice(qa[i])
                if args.question_first:
                    prefix = text(f"USER: {question}", add_special_tokens=False).input_ids
                    suffix = text(" ASSISTANT:", add_special_tokens=False).input_ids
                else:
                    prefix = text("USER:", add_special_tokens=False).input_ids
                    suffix = text(f" {question} ASSISTANT:", add_special_tokens=False).input_ids
                target = text(f" {answer}", add_special_tokens=False).input_ids[:1]
                rows.append((prefix, suffix, target))
                images.append(i)
                kinds.append(kind)
        tokens = list(image_tokens(x[images], ids[images]))  # per image (64, width)
        if args.drop_background:
            tokens = [t[keep] for t, keep in zip(tokens, foreground(ids[images]), strict=True)]
        length = max(1 + len(p) + len(t) + len(s) + 1 for (p, s, _), t in zip(rows, tokens, strict=True))
        embeds = torch.zeros(len(rows), length, width)
        labels = torch.full((len(rows), length), -100)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for b, (prefix, suffix, target) in enumerate(rows):
            parts = [
                embedding(torch.tensor([text.bos_token_id, *prefix])),
                tokens[b],
                embedding(torch.tensor(suffix + target)),
            ]
            row = torch.cat(parts)
            embeds[b, : len(row)] = row
            mask[b, : len(row)] = 1
            labels[b, len(row) - 1] = target[0]
        return embeds, mask, labels, kinds

    def evaluate(step: int, x, ids, qa) -> str:
        """Accuracy on the first `--val-images` images of a split (train is scored on as many as val)."""
        lm.eval()
        random.seed(123)  # the same questions at every evaluation
        right = {k: 0 for k in kinds}
        total = {k: 0 for k in kinds}
        scored = min(args.val_images, len(qa))  # train is scored on as many images as val, when it has them
        with torch.no_grad():
            for start in range(0, scored, 50):
                embeds, mask, labels, asked = batch(x, ids, qa, range(start, min(start + 50, scored)))
                logits = lm(inputs_embeds=embeds, attention_mask=mask).logits
                where = labels[:, 1:] != -100
                correct = (logits[:, :-1][where].argmax(-1) == labels[:, 1:][where]).tolist()
                for kind, ok in zip(asked, correct, strict=True):
                    right[kind] += ok
                    total[kind] += 1
        random.seed(1000 + step)
        lm.train()
        overall = sum(right.values()) / sum(total.values())
        return " ".join([f"{overall:.3f}"] + [f"{k} {right[k] / max(1, total[k]):.3f}" for k in kinds])

    params = [*lm.parameters(), *patch_proj.parameters(), *local_mixer.parameters(), cell_embedding]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    start_time = time.time()
    for step in range(1, args.steps + 1):
        embeds, mask, labels, _ = batch(
            x_train, ids_train, qa_train, random.sample(range(args.train_images), args.batch_size)
        )
        loss = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % args.eval_every == 0:
            val = evaluate(step, x_val, ids_val, qa_val)
            print(
                f"{args.variant} step {step} loss {loss.item():.3f} val accuracy {val} "
                f"train accuracy {evaluate(step, x_train, ids_train, qa_train)} "
                f"{time.time() - start_time:.0f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
