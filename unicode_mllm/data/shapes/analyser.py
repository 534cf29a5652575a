"""Read a shapes-world image back into a `Scene`, and score an image against the scene it should show.

The analyser (`analyse`) works on any RGB image, rendered or generated (grid = thirds of the image):
1. background: the per-channel median pixel (objects cover under a fifth of any world image), named
   after the nearest of `cfg.backgrounds`;
2. foreground: every pixel p is explained as a blend of the background b and one object colour c,
   p ~ b + alpha * (c - b), in a luma-weighted YCbCr space; the colour with the smallest residual
   wins, and the pixel is foreground when its alpha exceeds 1/2;
3. objects: 8-connected components of foreground pixels, ignoring specks smaller than a fifth of
   the smallest object the world draws (objects never touch in world images, so one component is
   one object; touching objects in a generated image read as one object, which fails the count);
4. colour: the palette colour nearest to the mean of the pixels deep inside the component (JPEG
   desaturates edges), checked again inside the fitted template;
5. shape: the component's soft coverage (alpha for its colour, over the component and a one-pixel
   rim) is compared with each shape's template (`render.shape_coverage`), placed so that its area
   and centroid match. The template with the least mean absolute difference wins; a blob no
   template fits within `MAX_FIT_ERROR` is reported as shape "unknown";
6. position: the grid cell of the fitted square's centre; size: small/large by the fitted side,
   split at the geometric mean of the two sizes.
Measured exact-scene accuracy: see scripts/measure_analyser.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from unicode_mllm.data.shapes.config import BACKGROUND_COLOURS, OBJECT_COLOURS, POSITIONS, ShapesConfig
from unicode_mllm.data.shapes.language import parse_instruction
from unicode_mllm.data.shapes.render import SHAPE_MOMENTS, SIZE_FRACTIONS, shape_coverage
from unicode_mllm.data.shapes.scene import Scene, SceneObject
from unicode_mllm.errors import UserError

UNKNOWN_SHAPE = "unknown"
# Mean |coverage - template| per unit of blob area above which no shape is claimed. Rendered shapes fit
# their own template far below this, also under noise and JPEG (see scripts/measure_analyser.py).
MAX_FIT_ERROR = 0.45
MIN_ALPHA = 0.1  # coverage below this is treated as noise, so a noisy background adds no area
# Colour differences are measured in JPEG's YCbCr space with chroma down-weighted: JPEG stores chroma
# at half resolution (4:2:0), so for outlines luma is the trustworthy signal, while telling red from
# purple (equal luma) needs chroma. The weights were picked with scripts/measure_analyser.py (JPEG q75).
_COVERAGE_CHROMA_WEIGHT = 0.15
_COLOUR_CHROMA_WEIGHT = 0.3


def _weighted_ycbcr(chroma_weight: float) -> np.ndarray:
    """(3, 3) matrix taking RGB to (Y, Cb * chroma_weight, Cr * chroma_weight)."""
    ycbcr = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    return ycbcr * np.array([[1.0], [chroma_weight], [chroma_weight]])


_COVERAGE_SPACE = _weighted_ycbcr(_COVERAGE_CHROMA_WEIGHT)
_COLOUR_SPACE = _weighted_ycbcr(_COLOUR_CHROMA_WEIGHT)
_SIZE_SPLIT = math.sqrt(SIZE_FRACTIONS["small"] * SIZE_FRACTIONS["large"])


@dataclass(frozen=True)
class Detection:
    """One object found in an image, with the fitted square (pixels) and how well the shape fit."""

    obj: SceneObject
    cx: float
    cy: float
    side: float
    fit_error: float  # mean |coverage - template| per unit of area for the chosen shape


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(h, w, 3) float64 in [0, 255] from a PIL image, a uint8 array or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise UserError(f"image array has shape {array.shape}; pass an (h, w, 3) RGB array or a PIL image")
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating):
        if array.min() < -1e-3 or array.max() > 1 + 1e-3:
            raise UserError(
                f"float image array spans [{array.min():.3g}, {array.max():.3g}]; scale it to [0, 1] (or pass uint8)"
            )
        return array.astype(np.float64) * 255.0
    raise UserError(f"image array has dtype {array.dtype}; pass uint8 in [0, 255] or float in [0, 1]")


def _shift_stack(mask: np.ndarray, fill: Any) -> np.ndarray:
    """The 3x3 neighbourhood of every pixel as a (9, h, w) stack, padded with `fill`."""
    h, w = mask.shape
    padded = np.pad(mask, 1, constant_values=fill)
    return np.stack([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])


def _dilate(mask: np.ndarray) -> np.ndarray:
    return _shift_stack(mask, False).any(axis=0)


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a boolean mask (0 = background, labels not consecutive)."""
    h, w = mask.shape
    none = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), none)
    while True:  # propagate the smallest label through each component; about one pass per pixel of width
        spread = np.where(mask, _shift_stack(labels, none).min(axis=0), none)
        if np.array_equal(spread, labels):
            return np.where(mask, labels, 0)
        labels = spread


class _Fit(NamedTuple):
    error: float  # mean |coverage - template| per unit of blob area
    shape: str
    cx: float
    cy: float
    side: float
    template: np.ndarray  # (h, w) coverage of the placed shape


class ShapesAnalyser:
    """Finds the objects of a shapes-world image; the vocabulary and palette come from `cfg`."""

    def __init__(self, cfg: ShapesConfig | None = None):
        self.cfg = cfg or ShapesConfig()
        self.colour_names = tuple(self.cfg.colours)
        self.palette = np.array([OBJECT_COLOURS[c] for c in self.colour_names], dtype=np.float64)  # (k, 3)
        self.background_names = tuple(self.cfg.backgrounds)
        self.background_palette = np.array([BACKGROUND_COLOURS[b] for b in self.background_names], dtype=np.float64)

    def detect(self, image: Image.Image | np.ndarray) -> tuple[list[Detection], str]:
        """(objects found, in reading order of their cells; background name). See the module docstring."""
        pixels = _as_array(image)  # (h, w, 3)
        h, w, _ = pixels.shape
        cell = min(h, w) / 3
        background_rgb = np.median(pixels.reshape(-1, 3), axis=0)
        background = self.background_names[
            int(np.argmin(((self.background_palette - background_rgb) ** 2).sum(axis=1)))
        ]
        diff = (pixels - background_rgb) @ _COVERAGE_SPACE.T  # (h, w, 3)
        direction = (self.palette - background_rgb) @ _COVERAGE_SPACE.T  # (k, 3)
        alpha = np.einsum("hwc,kc->hwk", diff, direction) / (direction**2).sum(axis=1)  # (h, w, k)
        alpha = alpha.clip(0.0, 1.0)
        residual = ((diff[:, :, None, :] - alpha[..., None] * direction) ** 2).sum(axis=-1)  # (h, w, k)
        best = residual.argmin(axis=2)  # (h, w)
        foreground = np.take_along_axis(alpha, best[..., None], axis=2)[..., 0] > 0.5

        min_area = 0.2 * SHAPE_MOMENTS["triangle"][0] * (SIZE_FRACTIONS["small"] * cell) ** 2
        labels = _components(foreground)
        blobs = [labels == label for label in np.unique(labels[labels > 0])]
        blobs = [blob for blob in blobs if blob.sum() >= min_area]
        taken = np.zeros((h, w), dtype=bool)
        for blob in blobs:
            taken |= blob
        detections = []
        for blob in blobs:
            region = _dilate(blob) & ~(taken & ~blob)  # the blob and its rim, minus other objects
            k = self._colour(pixels, background_rgb, blob.astype(np.float64))
            fit = self._fit(self._coverage(alpha[..., k], region, blob))
            # Second look at the colour: the fitted template says which pixels the shape covers fully,
            # and those show the object's colour undimmed by anti-aliasing.
            k_fitted = self._colour(pixels, background_rgb, fit.template)
            if k_fitted != k:
                k = k_fitted
                fit = self._fit(self._coverage(alpha[..., k], region, blob))
            detections.append(self._detection(fit, self.colour_names[k], cell))
        detections.sort(key=lambda d: (POSITIONS.index(d.obj.position), d.cx))
        return detections, background

    @staticmethod
    def _coverage(alpha: np.ndarray, region: np.ndarray, blob: np.ndarray) -> np.ndarray:
        """A blob's soft coverage (h, w) by one palette colour's alpha, within its region.

        Falls back to the blob's own mask when that colour covers none of it (a generated blob whose
        pixels are each nearest another colour than their mean is): a shape fit needs a positive area.
        """
        coverage = np.where(region & (alpha >= MIN_ALPHA), alpha, 0.0)
        return coverage if coverage.sum() > 0 else blob.astype(np.float64)

    def _colour(self, pixels: np.ndarray, background_rgb: np.ndarray, coverage: np.ndarray) -> int:
        """Index of the palette colour of an object; pixels (h, w, 3) RGB, coverage (h, w) in [0, 1].

        Uses the mean of the pixels deep inside the object (covered >= 0.99 and so are their 8
        neighbours) when there are any, else undoes the blend: colour = background + sum(t (p -
        background)) / sum(t^2) with t the coverage. JPEG averages chroma over 2x2 pixels, so edge
        pixels keep their luma but lose colour (an orange edge on black turns yellow); the nearest
        colour is measured in the luma-weighted space, where luma separates orange from yellow.
        """
        full = coverage >= 0.99
        full &= ~_dilate(~full)
        if full.any():
            mean = pixels[full].mean(axis=0)  # (3,)
        else:
            weights = coverage[..., None]
            norm = float((weights**2).sum())
            if norm <= 0:  # an empty coverage measures nothing: fall back to the whole image's mean colour
                return int(
                    np.argmin((((self.palette - pixels.reshape(-1, 3).mean(axis=0)) @ _COLOUR_SPACE.T) ** 2).sum(1))
                )
            mean = background_rgb + (weights * (pixels - background_rgb)).sum(axis=(0, 1)) / norm
        distance = (((self.palette - mean) @ _COLOUR_SPACE.T) ** 2).sum(axis=1)  # (k,)
        return int(distance.argmin())

    def _fit(self, coverage: np.ndarray) -> _Fit:
        """The shape whose template best matches a blob's soft coverage (h, w).

        Each template is placed so that its area and centroid equal the blob's; the rest is up to the
        shape, which keeps the fit to one render per shape.
        """
        area = float(coverage.sum())
        ys, xs = np.nonzero(coverage)
        weights = coverage[ys, xs]
        mean_x = float((weights * (xs + 0.5)).sum() / area)
        mean_y = float((weights * (ys + 0.5)).sum() / area)
        fits = []
        for shape in self.cfg.shapes:
            shape_area, centroid_u, centroid_v = SHAPE_MOMENTS[shape]
            side = math.sqrt(area / shape_area)
            cx, cy = mean_x - centroid_u * side, mean_y - centroid_v * side
            window, (top, left) = shape_coverage(shape, cx, cy, side, *coverage.shape)
            template = np.zeros_like(coverage)
            template[top : top + window.shape[0], left : left + window.shape[1]] = window
            error = float(np.abs(coverage - template).sum()) / area
            fits.append(_Fit(error, shape, cx, cy, side, template))
        return min(fits, key=lambda f: f.error)

    @staticmethod
    def _detection(fit: _Fit, colour: str, cell: float) -> Detection:
        col = min(2, max(0, int(fit.cx // cell)))
        row = min(2, max(0, int(fit.cy // cell)))
        obj = SceneObject(
            shape=fit.shape if fit.error <= MAX_FIT_ERROR else UNKNOWN_SHAPE,
            colour=colour,
            size="small" if fit.side / cell < _SIZE_SPLIT else "large",
            position=POSITIONS[3 * row + col],
            offset=(round(fit.cx / cell - col - 0.5, 4), round(fit.cy / cell - row - 0.5, 4)),
        )
        return Detection(obj=obj, cx=fit.cx, cy=fit.cy, side=fit.side, fit_error=fit.error)

    def analyse(self, image: Image.Image | np.ndarray) -> Scene:
        """The scene an image shows: objects (reading order) with shape, colour, size, position; background.

        `image` is a PIL image or an (h, w, 3) array, uint8 or float in [0, 1]. Raises UserError for
        other arrays.
        """
        detections, background = self.detect(image)
        return Scene(objects=tuple(d.obj for d in detections), background=background)


@dataclass(frozen=True)
class ShapesScore:
    """How well an image shows a target scene (GenEval-style; see `score` for the definitions)."""

    shape: float
    colour: float
    position: float
    size: float
    count: bool
    background: bool
    overall: bool
    exact: bool
    num_target: int
    num_found: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_MAX_EXACT_MATCH = 12


def _match(target: tuple[SceneObject, ...], found: tuple[SceneObject, ...]) -> list[SceneObject | None]:
    """One-to-one assignment of found objects to target objects.

    Maximises, first, the number of agreeing (shape, colour, position) attributes and, second, the
    number of agreeing sizes; exact over all assignments (dynamic programming over subsets of `found`)
    up to `_MAX_EXACT_MATCH` found objects, greedy beyond (only noise makes that many blobs).
    """

    def gain(t: SceneObject, f: SceneObject) -> int:
        core = (t.shape == f.shape) + (t.colour == f.colour) + (t.position in (None, f.position))
        return 100 * core + (t.size in (None, f.size))

    memo: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {}

    def best(i: int, used: int) -> tuple[int, tuple[int, ...]]:
        if i == len(target):
            return 0, ()
        if (i, used) not in memo:
            options = [(best(i + 1, used)[0], (-1, *best(i + 1, used)[1]))]  # leave target i unmatched
            for j, f in enumerate(found):
                if not used & (1 << j):
                    rest, picks = best(i + 1, used | (1 << j))
                    options.append((rest + gain(target[i], f), (j, *picks)))
            memo[(i, used)] = max(options, key=lambda o: o[0])
        return memo[(i, used)]

    if len(found) > _MAX_EXACT_MATCH:  # 2^m subsets would be too many: match greedily, best pairs first
        ranked = sorted(((gain(t, f), i, j) for i, t in enumerate(target) for j, f in enumerate(found)), reverse=True)
        greedy: list[SceneObject | None] = [None] * len(target)
        used: set[int] = set()
        for _, i, j in ranked:
            if greedy[i] is None and j not in used:
                greedy[i] = found[j]
                used.add(j)
        return greedy
    _, picks = best(0, 0)
    return [found[j] if j >= 0 else None for j in picks]


def score(image: Image.Image | np.ndarray, target: Scene | str, cfg: ShapesConfig | None = None) -> ShapesScore:
    """Score `image` against `target` (a Scene, or an instruction read by `parse_instruction`).

    The found objects (`analyse`) are matched one-to-one to the target objects, maximising agreement on
    shape, colour and position first and size second. Then, over the target objects (an unmatched
    target counts as wrong everywhere; a None size/position in the target accepts anything):
    - `shape`, `colour`, `position`, `size`: fraction whose matched object has that attribute right;
    - `count`: as many objects found as the target lists;
    - `background`: the background is right (always True when the target names none);
    - `overall`: every target object matched with shape, colour and position all right, and `count`;
    - `exact`: `overall`, every size right, and `background`.
    An empty target scores 1.0 on each fraction.

    Raises UserError when `target` is text that `parse_instruction` cannot read.
    """
    if isinstance(target, str):
        target = parse_instruction(target)
    found = ShapesAnalyser(cfg).analyse(image)
    matched = _match(target.objects, found.objects)
    n = len(target.objects)

    def fraction(ok: list[bool]) -> float:
        return sum(ok) / n if n else 1.0

    pairs = [(t, f) for t, f in zip(target.objects, matched, strict=True)]
    shape_ok = [f is not None and f.shape == t.shape for t, f in pairs]
    colour_ok = [f is not None and f.colour == t.colour for t, f in pairs]
    position_ok = [f is not None and t.position in (None, f.position) for t, f in pairs]
    size_ok = [f is not None and t.size in (None, f.size) for t, f in pairs]
    count_ok = len(found.objects) == n
    background_ok = target.background in (None, found.background)
    overall = count_ok and all(s and c and p for s, c, p in zip(shape_ok, colour_ok, position_ok, strict=True))
    return ShapesScore(
        shape=fraction(shape_ok),
        colour=fraction(colour_ok),
        position=fraction(position_ok),
        size=fraction(size_ok),
        count=count_ok,
        background=background_ok,
        overall=overall,
        exact=overall and all(size_ok) and background_ok,
        num_target=n,
        num_found=len(found.objects),
    )


def analyse(image: Image.Image | np.ndarray, cfg: ShapesConfig | None = None) -> Scene:
    """Shorthand for `ShapesAnalyser(cfg).analyse(image)`."""
    return ShapesAnalyser(cfg).analyse(image)
