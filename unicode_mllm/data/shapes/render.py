"""Draw a `Scene` as an anti-aliased RGB image, plus the two corruptions the analyser is tested under.

Geometry. The image is split into a 3x3 grid of cells of side `image_size / 3`. An object of size
`small`/`large` fills a square of side `SIZE_FRACTIONS[size] * cell` centred on its cell centre plus
`offset * cell`; every shape touches all four sides of that square. The analyser uses the same
`shape_coverage` to build its templates, so a clean image is matched exactly.

Anti-aliasing is 4x supersampling with a box filter: each pixel's coverage is the fraction of its
4x4 sub-pixel sample points inside the shape, and the pixel is `background * (1 - coverage) + colour
* coverage`. Objects never overlap, so this equals drawing the whole picture at 4x and box-downsampling.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from unicode_mllm.data.shapes.config import BACKGROUND_COLOURS, OBJECT_COLOURS, POSITIONS
from unicode_mllm.data.shapes.scene import Scene, SceneObject
from unicode_mllm.errors import UserError

SUPERSAMPLE = 4
# Side of the shape's square as a fraction of the cell side. A large object leaves a margin of 10% of
# the cell on each side, which `position_jitter` may eat into but never close.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.48, "large": 0.8}
CROSS_ARM = 0.36  # arm thickness of the cross, as a fraction of its square
STAR_INNER = 0.45  # inner / outer radius of the five-pointed star (a regular star is 0.38; fatter points
# survive 10 px renders and JPEG)


def _star_polygon() -> np.ndarray:
    angles = -math.pi / 2 + np.arange(10) * math.pi / 5  # first point straight up
    radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return (pts - lo) / (hi - lo) - 0.5  # stretch to fill the unit square exactly


def _cross_polygon() -> np.ndarray:
    a, h = CROSS_ARM / 2, 0.5
    return np.array(
        [(-a, -h), (a, -h), (a, -a), (h, -a), (h, a), (a, a), (a, h), (-a, h), (-a, a), (-h, a), (-h, -a), (-a, -a)]
    )


# Polygons in unit-square coordinates (u right, v down, both in [-0.5, 0.5]); the circle is analytic.
POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]),
    "triangle": np.array([(0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)]),  # apex up
    "diamond": np.array([(0.0, -0.5), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0)]),
    "star": _star_polygon(),
    "cross": _cross_polygon(),
}


def _inside_polygon(poly: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd crossing test of points (u, v) against a closed polygon (e, 2)."""
    inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    for (u0, v0), (u1, v1) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        if v0 == v1:
            continue  # a horizontal edge never crosses the horizontal ray
        crosses = (v0 > v) != (v1 > v)
        u_cross = u0 + (v - v0) * (u1 - u0) / (v1 - v0)
        inside ^= crosses & (u < u_cross)
    return inside


def inside_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of the points (u, v), in unit-square coordinates, that lie inside `shape`."""
    if shape == "circle":
        return u * u + v * v <= 0.25
    if shape not in POLYGONS:
        raise UserError(f"shape {shape!r} is unknown; choose one of {sorted(['circle', *POLYGONS])}")
    return _inside_polygon(POLYGONS[shape], u, v)


def _polygon_moments(poly: np.ndarray) -> tuple[float, float, float]:
    u, v = poly[:, 0], poly[:, 1]
    u1, v1 = np.roll(u, -1), np.roll(v, -1)
    cross = u * v1 - u1 * v
    area = cross.sum() / 2
    return abs(area), float(((u + u1) * cross).sum() / (6 * area)), float(((v + v1) * cross).sum() / (6 * area))


# (area, centroid u, centroid v) of each shape in its unit square: the analyser turns a blob's area and
# centroid into the square's side and centre with these.
SHAPE_MOMENTS: dict[str, tuple[float, float, float]] = {
    "circle": (math.pi / 4, 0.0, 0.0),
    **{name: _polygon_moments(poly) for name, poly in POLYGONS.items()},
}


def shape_coverage(
    shape: str, cx: float, cy: float, side: float, height: int, width: int, supersample: int = SUPERSAMPLE
) -> tuple[np.ndarray, tuple[int, int]]:
    """Fraction of each pixel covered by `shape` filling the square of `side` px centred at (cx, cy).

    Pixel (row i, column j) spans [j, j+1) x [i, i+1) in image coordinates. Only the bounding window
    is computed. Returns (coverage (h', w') float64 in [0, 1], (top, left) of the window in the image);
    the window is clipped to the image and may be empty.
    """
    half = side / 2
    top, left = max(0, math.floor(cy - half)), max(0, math.floor(cx - half))
    bottom, right = min(height, math.ceil(cy + half)), min(width, math.ceil(cx + half))
    if bottom <= top or right <= left:
        return np.zeros((0, 0)), (top, left)
    sub = (np.arange(supersample) + 0.5) / supersample
    ys = (np.arange(top, bottom)[:, None] + sub[None, :]).reshape(-1)  # (h' * s,)
    xs = (np.arange(left, right)[:, None] + sub[None, :]).reshape(-1)  # (w' * s,)
    hit = inside_shape(shape, (xs[None, :] - cx) / side, (ys[:, None] - cy) / side)
    hit = hit.reshape(bottom - top, supersample, right - left, supersample)
    return hit.mean(axis=(1, 3)), (top, left)


def object_geometry(obj: SceneObject, image_size: int) -> tuple[float, float, float]:
    """(cx, cy, side) in pixels of the square that `obj` fills in an `image_size` image."""
    if obj.size not in SIZE_FRACTIONS or obj.position not in POSITIONS:
        raise UserError(
            f"cannot draw {obj.colour} {obj.shape} with size {obj.size!r} and position {obj.position!r}: "
            f"give a size in {list(SIZE_FRACTIONS)} and a position in {list(POSITIONS)}"
        )
    cell = image_size / 3
    row, col = divmod(POSITIONS.index(obj.position), 3)
    cx = (col + 0.5 + obj.offset[0]) * cell
    cy = (row + 0.5 + obj.offset[1]) * cell
    return cx, cy, SIZE_FRACTIONS[obj.size] * cell


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw `scene` as an `image_size` x `image_size` PIL RGB image (uint8).

    Raises UserError for a colour, background, shape, size or position the world does not know.
    """
    if scene.background not in BACKGROUND_COLOURS:
        raise UserError(f"background {scene.background!r} is unknown; choose one of {list(BACKGROUND_COLOURS)}")
    canvas = np.empty((image_size, image_size, 3), dtype=np.float64)
    canvas[:] = BACKGROUND_COLOURS[scene.background]
    for obj in scene.objects:
        if obj.colour not in OBJECT_COLOURS:
            raise UserError(f"colour {obj.colour!r} is unknown; choose one of {list(OBJECT_COLOURS)}")
        cx, cy, side = object_geometry(obj, image_size)
        coverage, (top, left) = shape_coverage(obj.shape, cx, cy, side, image_size, image_size)
        h, w = coverage.shape
        window = canvas[top : top + h, left : left + w]
        colour = np.asarray(OBJECT_COLOURS[obj.colour], dtype=np.float64)
        window += coverage[..., None] * (colour - window)
    return Image.fromarray(np.rint(canvas).clip(0, 255).astype(np.uint8))


def add_gaussian_noise(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    """`image` plus i.i.d. Gaussian noise of std `sigma` (in 0-255 units) per channel, clipped to uint8."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    noisy = pixels + rng.normal(0.0, sigma, size=pixels.shape)
    return Image.fromarray(np.rint(noisy).clip(0, 255).astype(np.uint8))


def jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    """`image` saved as JPEG at `quality` (PIL defaults, 4:2:0 chroma subsampling) and decoded again."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")
