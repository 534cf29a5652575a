"""Probe: how many labelled images does a small vision model need to name the shape of one object?

The reference point for `scripts/lm_reading_control.py`: single-object shapes images (chance 1/5), the
same 4,000 training images, batch 32 and AdamW 1e-3, with a plain classifier instead of the tiny LM:

- `cnn_max` / `cnn_mean`: three 3x3 conv layers on the pixels (32-64-64 channels, 2x2 max pools between)
  then global max / mean pooling and a linear head (~60k parameters);
- `patch_conv_max` / `patch_conv_mean`: the LM reading's front end, 4x4-pixel patches through a linear
  map to 128 wide tokens on an 8x8 grid, then two 3x3 convs on that grid (GELU between, residual),
  global max / mean pooling and a linear head;
- `--tokens codes`: the patch tokens replaced by what stage 2 reads, the visual tokenizer's aggregated
  code embeddings (the LM's embedding rows, summed per position; fixed, not trained here); with
  `--image-size` larger than the tokenizer's, the codes come on a larger grid (the encoder is convolutional);
- `vit`: the same patch tokens with learned positions and a class token through a 4-layer, 128-wide,
  4-head pre-norm transformer encoder (the tiny LM's size, bidirectional, from scratch);
- `cell_bag_linear` / `cell_bag_mlp` (codes only, a code grid divisible by 3, e.g. `--image-size 48`): the
  mean of the aggregated code embeddings over the world cell that holds the object (the cell is given, so
  nothing has to be found), into a linear classifier or a one-hidden-layer MLP: is shape in the codes of
  the object's cell as a bag, without their arrangement?

Prints validation accuracy every 100 steps. RESULTS.md ("Why the tiny LM does not learn shapes") has the
command and the figures. CPU, under three minutes per mode.

    python scripts/shape_recognition_probe.py --mode cnn_max
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import Tensor, nn

from unicode_mllm.data.shapes import ShapesConfig, ShapesWorld
from unicode_mllm.data.shapes.config import POSITIONS

MODES = ("cnn_max", "cnn_mean", "patch_conv_max", "patch_conv_mean", "vit", "cell_bag_linear", "cell_bag_mlp")
WIDTH = 128  # the tiny LM's hidden size
GRID = 8  # patches per side


def load_split(world: ShapesWorld, split: str, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """(images (n, 3, H, W) in [-1, 1], shape labels (n,), the object's 3x3 cell (n,)) of single-object scenes."""
    shapes = list(world.cfg.shapes)
    images, labels, cells = [], [], []
    for index in range(count):
        sample = world.sample(split, index)
        images.append(np.asarray(sample.image))
        labels.append(shapes.index(sample.scene.objects[0].shape))
        cells.append(POSITIONS.index(sample.scene.objects[0].position))
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.tensor(labels), torch.tensor(cells)


class PixelCNN(nn.Module):
    def __init__(self, pool: str, classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
        )  # fmt: skip
        self.pool = pool
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x).flatten(2)  # (b, 64, h*w)
        return self.head(f.amax(-1) if self.pool == "max" else f.mean(-1))


def code_embeddings(x: Tensor, tokenizer_dir: str, lm_dir: str, layout: str = "sum") -> Tensor:
    """(n, 3, H, W) -> (n, h, w, c): the aggregated reading of the frozen visual tokenizer's codes.

    The encoder is convolutional, so images larger than the tokenizer's training size are coded too (on
    a proportionally larger grid: `encode(..., any_size=True)`). layout `spatial` (`hq` only) keeps each
    bottom code at its own place on the 2h x 2w grid, plus its top code, instead of summing the five.
    """
    from transformers import AutoModelForCausalLM

    from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

    tokenizer = VisualTokenizer.from_pretrained(tokenizer_dir).eval()
    rows = AutoModelForCausalLM.from_pretrained(lm_dir).get_input_embeddings().weight.detach()
    with torch.no_grad():
        codes = [tokenizer.encode(x[i : i + 256], any_size=True) for i in range(0, len(x), 256)]
    embeds = rows[tokenizer.codes_to_token_ids(torch.cat(codes))]  # (n, h, w, d, c)
    if layout == "sum":
        return embeds.sum(dim=3)
    if layout == "rolled":  # slot k's embedding with its channels rotated by k*c/d, then summed (h*w tokens)
        d, c = embeds.shape[3], embeds.shape[4]
        return sum(torch.roll(embeds[:, :, :, k], shifts=k * c // d, dims=-1) for k in range(d))
    if embeds.shape[3] != 5:
        raise SystemExit(f"--codes-layout spatial needs an hq tokenizer (5 codes per position); got {embeds.shape[3]}")
    n, h, w, _, c = embeds.shape
    bottom = embeds[:, :, :, 1:].reshape(n, h, w, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, c)
    return bottom + embeds[:, :, :, 0].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)


def cell_bags(embeddings: Tensor, cells: Tensor) -> Tensor:
    """(n, h, w, c) aggregated embeddings, (n,) cell index -> (n, c): the mean over that 3x3 world cell."""
    n, h, w, c = embeddings.shape
    if h % 3 or w % 3:
        raise SystemExit(f"cell bags need a code grid divisible by 3; got {h}x{w} (try --image-size 48)")
    per_cell = embeddings.reshape(n, 3, h // 3, 3, w // 3, c).mean(dim=(2, 4)).reshape(n, 9, c)
    return per_cell[torch.arange(n), cells]


class PatchTokens(nn.Module):
    """(b, 3, H, W) -> (b, 64, WIDTH): non-overlapping patches through one linear map."""

    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(3 * patch * patch, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch
        patches = x.unfold(2, p, p).unfold(3, p, p)  # (b, 3, 8, 8, p, p)
        return self.proj(patches.permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], GRID * GRID, -1))


class PatchConv(nn.Module):
    """patch: pixels per patch side, or 0 when the input is already (b, 64, WIDTH) tokens (codes)."""

    def __init__(self, patch: int, pool: str, classes: int):
        super().__init__()
        self.tokens = PatchTokens(patch) if patch else nn.Identity()
        self.mixer = nn.Sequential(
            nn.Conv2d(WIDTH, WIDTH, 3, padding=1), nn.GELU(), nn.Conv2d(WIDTH, WIDTH, 3, padding=1)
        )
        self.pool = pool
        self.head = nn.Linear(WIDTH, classes)

    def forward(self, x: Tensor) -> Tensor:
        t = self.tokens(x)  # (b, side*side, c): 8x8 patches, or codes on the tokenizer's grid
        side = math.isqrt(t.shape[1])
        grid = t.transpose(1, 2).reshape(t.shape[0], WIDTH, side, side)
        t = t + self.mixer(grid).flatten(2).transpose(1, 2)
        return self.head(t.amax(1) if self.pool == "max" else t.mean(1))


class TinyViT(nn.Module):
    def __init__(self, patch: int, classes: int):
        super().__init__()
        self.tokens = PatchTokens(patch) if patch else nn.Identity()
        self.cls = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.positions = nn.Parameter(torch.randn(1, GRID * GRID, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 3 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, classes)

    def forward(self, x: Tensor) -> Tensor:
        t = self.tokens(x) + self.positions
        t = self.encoder(torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1))
        return self.head(t[:, 0])


def build(mode: str, patch: int, classes: int) -> nn.Module:
    if mode == "cell_bag_linear":
        return nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, classes))
    if mode == "cell_bag_mlp":
        return nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, classes))
    if mode.startswith("cnn_"):
        return PixelCNN(mode.removeprefix("cnn_"), classes)
    if mode.startswith("patch_conv_"):
        return PatchConv(patch, mode.removeprefix("patch_conv_"), classes)
    return TinyViT(patch, classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", choices=["patches", "codes"], default="patches", help="patch_conv_* and vit only")
    parser.add_argument("--tokenizer", default="runs/tokenizer/tiny/final", help="visual tokenizer for --tokens codes")
    parser.add_argument(
        "--codes-layout",
        choices=["sum", "rolled", "spatial"],
        default="sum",
        help="--tokens codes: sum the D codes per position (aggregated reading) or, for hq, keep the four bottom "
        "codes at their places (2x finer grid, each plus its top code), or sum them with slot k's channels rolled by "
        "k*c/d (keeps which slot a code is in)",
    )
    parser.add_argument("--lm", default="runs/lm/tiny/model", help="the LM whose embedding rows the codes are")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    world = ShapesWorld(ShapesConfig(image_size=args.image_size, max_objects=1))
    x_train, y_train, cell_train = load_split(world, "train", args.train_images)
    x_val, y_val, cell_val = load_split(world, "val", args.val_images)
    patch = args.image_size // GRID
    if args.mode.startswith("cell_bag_") and args.tokens != "codes":
        parser.error(f"--mode {args.mode} reads codes: add --tokens codes")
    if args.tokens == "codes":
        if args.mode.startswith("cnn_"):
            parser.error("--tokens codes needs a patch_conv_*, vit or cell_bag_* mode")
        e_train, e_val = (code_embeddings(x, args.tokenizer, args.lm, args.codes_layout) for x in (x_train, x_val))
        if args.mode.startswith("cell_bag_"):
            x_train, x_val = cell_bags(e_train, cell_train), cell_bags(e_val, cell_val)
        else:
            if args.mode == "vit" and e_train.shape[1:3] != (GRID, GRID):
                parser.error(f"vit reads an {GRID}x{GRID} code grid; got {tuple(e_train.shape[1:3])}")
            x_train, x_val = e_train.flatten(1, 2), e_val.flatten(1, 2)
        patch = 0
    model = build(args.mode, patch, len(world.cfg.shapes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, args.train_images, (args.batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            with torch.no_grad():
                accuracy = (model(x_val).argmax(-1) == y_val).float().mean().item()
            print(f"{args.mode} step {step} loss {loss.item():.3f} val accuracy {accuracy:.3f} "
                  f"{time.time() - start:.0f}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
