"""`ShapesWorld`: deterministic scene sampling for the train / val / heldout splits, and `ShapesSample`.

Each sample draws from its own RNG, seeded from (cfg.seed, split, index) through numpy's SeedSequence,
so `world.sample("train", 42)` is the same image and text whatever was sampled before it, in any
process. Splits:
- `train`: no image contains a held-out colour+shape pair, and no question names one;
- `val`: drawn like train (a different RNG stream), for in-distribution evaluation;
- `heldout`: every image contains at least one held-out pair; the other objects are free.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from unicode_mllm.config import config_from_dict, config_to_dict
from unicode_mllm.data.shapes.config import POSITIONS, SIZE_NAMES, ShapesConfig
from unicode_mllm.data.shapes.language import INSTRUCTION_TEMPLATES, QAPair, caption, instruction, questions
from unicode_mllm.data.shapes.render import SIZE_FRACTIONS, render_scene
from unicode_mllm.data.shapes.scene import Scene, SceneObject
from unicode_mllm.errors import UserError

Split = Literal["train", "val", "heldout"]
SPLITS: tuple[str, ...] = ("train", "val", "heldout")


@dataclass(frozen=True)
class ShapesSample:
    """One image of the world with everything said about it."""

    id: str  # "<split>-<index:06d>", e.g. "train-000042"
    split: str
    index: int
    image: Image.Image  # RGB, image_size x image_size
    scene: Scene
    caption: str
    qa: tuple[QAPair, ...]
    instruction: str

    def to_json(self) -> dict[str, Any]:
        """Everything but the pixels, as a JSON-safe dict."""
        return {
            "id": self.id,
            "split": self.split,
            "image_size": self.image.size[0],
            "caption": self.caption,
            "qa": [q.to_dict() for q in self.qa],
            "instruction": self.instruction,
            "scene": self.scene.to_dict(),
        }


class ShapesWorld:
    """Samples scenes, images and text of the shapes world from a validated `ShapesConfig`.

    Raises ConfigError when `cfg` is out of range or fails `ShapesConfig.validate()`.
    """

    def __init__(self, cfg: ShapesConfig | None = None):
        cfg = cfg or ShapesConfig()
        # Re-run the loader's range checks and validate(): a hand-built config gets the same errors.
        self.cfg = config_from_dict(ShapesConfig, config_to_dict(cfg), source="ShapesConfig")
        self.train_pairs = self.cfg.train_pairs()
        self.held_out_pairs = self.cfg.held_out()
        self.all_pairs = tuple((c, s) for c in self.cfg.colours for s in self.cfg.shapes)

    def rng(self, split: str, index: int) -> np.random.Generator:
        """The sample's own generator, a function of (cfg.seed, split, index) only."""
        self._check(split, index)
        # crc32, not hash(): Python salts str hashes per process.
        return np.random.default_rng(np.random.SeedSequence([self.cfg.seed, zlib.crc32(split.encode()), index]))

    def _check(self, split: str, index: int) -> None:
        if split not in SPLITS:
            raise UserError(f"split {split!r} is unknown; choose one of {list(SPLITS)}")
        if split == "heldout" and not self.held_out_pairs:
            raise UserError("split 'heldout' needs held-out pairs; set held_out_pairs, e.g. ['red triangle']")
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise UserError(f"sample index {index!r} must be a non-negative integer")

    def sample_scene(self, split: str, index: int, rng: np.random.Generator | None = None) -> Scene:
        """The scene of sample `index` of `split` (objects in reading order of their cells)."""
        if rng is None:
            rng = self.rng(split, index)
        cfg = self.cfg
        num_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        cells = sorted(int(c) for c in rng.choice(len(POSITIONS), size=num_objects, replace=False))
        allowed = self.all_pairs if split == "heldout" else self.train_pairs
        pairs = [allowed[rng.integers(len(allowed))] for _ in cells]
        if split == "heldout":
            pairs[rng.integers(num_objects)] = self.held_out_pairs[rng.integers(len(self.held_out_pairs))]
        objects = []
        for cell, (colour, shape) in zip(cells, pairs, strict=True):
            size = SIZE_NAMES[rng.integers(len(SIZE_NAMES))]
            offset = self._offset(size, rng)
            objects.append(SceneObject(shape, colour, size, POSITIONS[cell], offset))
        background = cfg.backgrounds[rng.integers(len(cfg.backgrounds))]
        scene = Scene(objects=tuple(objects), background=background)
        self._check_split_invariant(scene, split)
        return scene

    def _offset(self, size: str, rng: np.random.Generator) -> tuple[float, float]:
        margin = (1.0 - SIZE_FRACTIONS[size]) / 2  # free space between shape and cell border, in cells
        dx, dy = rng.uniform(-1.0, 1.0, size=2) * self.cfg.position_jitter * margin
        return (round(float(dx), 4), round(float(dy), 4))  # rounded so JSON round-trips exactly

    def _check_split_invariant(self, scene: Scene, split: str) -> None:
        held = set(self.held_out_pairs)
        has_held = any(o.pair in held for o in scene.objects)
        if split == "heldout" and not has_held:
            raise AssertionError(f"heldout scene {scene} contains no held-out pair")
        if split != "heldout" and has_held:
            raise AssertionError(f"{split} scene {scene} contains a held-out pair")

    def sample(self, split: str, index: int) -> ShapesSample:
        """Sample `index` of `split`: image, scene, caption, questions and a drawing instruction.

        Raises UserError for an unknown split or a negative index.
        """
        rng = self.rng(split, index)
        scene = self.sample_scene(split, index, rng)
        pairs = self.all_pairs if split == "heldout" else self.train_pairs
        return ShapesSample(
            id=f"{split}-{index:06d}",
            split=split,
            index=int(index),
            image=render_scene(scene, self.cfg.image_size),
            scene=scene,
            caption=caption(scene),
            qa=tuple(questions(scene, rng, self.cfg.shapes, pairs)),
            instruction=instruction(scene, int(rng.integers(len(INSTRUCTION_TEMPLATES)))),
        )

    def iter_split(self, split: str, count: int, start: int = 0) -> Iterator[ShapesSample]:
        """Samples `start`, ..., `start + count - 1` of `split`."""
        for index in range(start, start + count):
            yield self.sample(split, index)
