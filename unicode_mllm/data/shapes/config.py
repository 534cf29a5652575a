"""`ShapesConfig`: the vocabulary, image size, object counts and held-out pairs of the shapes world.

Load it like every other config (`load_config(ShapesConfig, path)` or nested in a run config); the
loader checks ranges declared with `bounded` and then calls `validate()` for the cross-field checks.
`ShapesWorld` re-runs both on construction, so a hand-built config cannot skip them.
"""

from __future__ import annotations

from dataclasses import dataclass

from unicode_mllm.config import bounded

# RGB of every colour name the world knows. Object colours and background colours are separate sets so
# that an object can never vanish into its background. Every object colour keeps a luma (Y) gap of at
# least 45 (of 255) to every background, because JPEG keeps luma at full resolution but halves chroma
# (4:2:0), so the analyser reads outlines mostly from luma.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 20, 30),
    "green": (10, 120, 30),
    "blue": (30, 70, 230),
    "yellow": (250, 220, 30),
    "purple": (125, 35, 180),
    "orange": (255, 170, 0),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
# Every shape fills a square of side s (see render.py). The analyser tells all six apart (measured with
# `scripts/measure_analyser.py --shapes circle square triangle diamond star cross`); the default
# vocabulary leaves the cross out to keep the tiny preset's vocabulary small.
SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZE_NAMES: tuple[str, ...] = ("small", "large")
# Every image side must be a multiple of this: a visual tokenizer needs image_size divisible by its
# downsampling factor 2**(len(ch_mult)-1), and its hq stack needs the latent grid (image_size / factor)
# to be even; a multiple of 8 satisfies both for the presets (tiny: factor 2; 32 px) and keeps sizes simple.
IMAGE_SIZE_MULTIPLE = 8
# The 3x3 grid cells in reading order (row-major): index = 3 * row + column. One naming scheme,
# used by scenes, captions, answers and the instruction parser alike. Laid out as the grid (fmt: skip).
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip


def parse_pair(text: str) -> tuple[str, str]:
    """'red triangle' -> ('red', 'triangle'); raises ValueError unless it is exactly two words."""
    words = text.split()
    if len(words) != 2:
        raise ValueError(f"held-out pair {text!r} must be two words, '<colour> <shape>' (e.g. 'red triangle')")
    return words[0], words[1]


@dataclass(frozen=True)
class ShapesConfig:
    """The shapes world: which shapes, colours and backgrounds appear, how many objects, which pairs are held out.

    `image_size` is the side of the square image in pixels. Measured with scripts/measure_analyser.py
    (1,000 val images each), the analyser recovers the exact scene of 100% of clean and noisy images
    at 32, 64 and 128 px, and of 99.9% (64 px) and 100% (128 px) after JPEG at quality 75; at 32 px a
    small object is only ~5 px wide and JPEG drops exact recovery to ~83%, so score JPEG'd or
    generated images at 64 px or more.
    """

    image_size: int = bounded(64, min=32, max=256, help="side of the square image in pixels")
    min_objects: int = bounded(1, min=1, max=3, help="fewest objects in one image")
    max_objects: int = bounded(3, min=1, max=3, help="most objects in one image (one per 3x3 grid cell)")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    backgrounds: tuple[str, ...] = ("black", "white", "gray")
    # Colour+shape pairs never drawn in train/val images and always present in 'heldout' ones.
    held_out_pairs: tuple[str, ...] = ("red triangle", "blue star", "green square", "yellow circle")
    # Largest random shift of an object from its cell centre, as a fraction of the free margin between
    # the object and the cell border; 0.75 still leaves neighbouring objects a clear gap.
    position_jitter: float = bounded(0.5, min=0.0, max=0.75)
    seed: int = bounded(0, min=0)

    def held_out(self) -> tuple[tuple[str, str], ...]:
        """The held-out pairs as (colour, shape) tuples."""
        return tuple(parse_pair(p) for p in self.held_out_pairs)

    def train_pairs(self) -> tuple[tuple[str, str], ...]:
        """Every (colour, shape) pair that train and val images may contain, colour-major order."""
        held = set(self.held_out())
        return tuple((c, s) for c in self.colours for s in self.shapes if (c, s) not in held)

    def validate(self) -> None:
        """Cross-field checks; raises ValueError naming the bad value and the fix."""
        if self.image_size % IMAGE_SIZE_MULTIPLE:
            low = self.image_size - self.image_size % IMAGE_SIZE_MULTIPLE
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of {IMAGE_SIZE_MULTIPLE}, which the visual "
                f"tokenizers need (downsampling, then the hq stack halves the grid); use {low} or "
                f"{low + IMAGE_SIZE_MULTIPLE}"
            )
        _check_names("shapes", self.shapes, SHAPE_NAMES)
        _check_names("colours", self.colours, tuple(OBJECT_COLOURS))
        _check_names("backgrounds", self.backgrounds, tuple(BACKGROUND_COLOURS))
        if self.min_objects > self.max_objects:
            raise ValueError(
                f"min_objects={self.min_objects} is larger than max_objects={self.max_objects}; "
                "lower min_objects or raise max_objects"
            )
        pairs = [parse_pair(p) for p in self.held_out_pairs]
        for text, (colour, shape) in zip(self.held_out_pairs, pairs, strict=True):
            if colour not in self.colours:
                raise ValueError(f"held-out pair {text!r}: colour {colour!r} is not in colours {list(self.colours)}")
            if shape not in self.shapes:
                raise ValueError(f"held-out pair {text!r}: shape {shape!r} is not in shapes {list(self.shapes)}")
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"held_out_pairs {list(self.held_out_pairs)} lists a pair twice; remove the repeat")
        train = self.train_pairs()
        for colour in self.colours:
            if not any(c == colour for c, _ in train):
                raise ValueError(
                    f"held_out_pairs hold out every shape of colour {colour!r}, so training would never "
                    "see it; hold out fewer pairs with that colour"
                )
        for shape in self.shapes:
            if not any(s == shape for _, s in train):
                raise ValueError(
                    f"held_out_pairs hold out every colour of shape {shape!r}, so training would never "
                    "see it; hold out fewer pairs with that shape"
                )


def _check_names(key: str, names: tuple[str, ...], known: tuple[str, ...]) -> None:
    if not names:
        raise ValueError(f"{key} is empty; list at least one of {list(known)}")
    for name in names:
        if name not in known:
            raise ValueError(f"{key}: {name!r} is unknown; choose from {list(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{key} {list(names)} lists a name twice; remove the repeat")
