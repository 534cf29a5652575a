"""How an image of any size becomes the model's size x size input: the preprocessing policy of every stage.

`ImagePolicy` is a config section (stage 1: `data.image`) applied by `StreamingDataset` after decoding:

* ``exact``: the image must already have the target size; any other size is a counted "wrong image
  size" skip, never a resize (rendered shapes are never resampled).
* ``center_crop``: resize the shorter side to the target (bicubic, antialiased) and cut the centre,
  as torchvision's ``Resize(s) + CenterCrop(s)`` in the UniCode/LlamaGen reference code. An image
  already at the target size is returned untouched.
* ``random_resized_crop`` (training): a random area/aspect crop resized to the target, torchvision style.
* ``auto``: ``exact`` when the folder's manifest fixes an image size (`Manifest.image_size()`: shapes,
  a converter run with `expected_size`), ``center_crop`` otherwise (real photos of mixed sizes).

Random choices (crop box, flip) come from ``random.Random(f"aug-{seed}-{epoch}-{key}")``, never from global
RNG state: the same sample in the same epoch gets the same crop in every process and after a resume.
Evaluation, `tokenize` and `data inspect` use `for_eval()`, which has no random operation.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from unicode_mllm.config import bounded
from unicode_mllm.data.image_io import check_image_size, normalise_size
from unicode_mllm.errors import UserError

ResizeMode = Literal["auto", "center_crop", "random_resized_crop", "exact"]
Size = int | tuple[int, int]  # an int is a square side; a tuple is (h, w)

_RESAMPLE = Image.Resampling.BICUBIC  # PIL widens the kernel when downscaling, i.e. it is antialiased
_CROP_TRIES = 10  # torchvision's number of area/aspect draws before the centred fallback


@dataclass
class ImagePolicy:
    """How decoded images are brought to the model's size (see the module docstring).

    resize: "auto", "center_crop", "random_resized_crop" (training only; evaluation centre-crops) or "exact".
    hflip: flip horizontally with probability 1/2 (training only).
    crop_scale: random_resized_crop's range of the crop's share of the image area, within (0, 1].
    crop_ratio: random_resized_crop's range of the crop's width / height.
    """

    resize: ResizeMode = "auto"
    hflip: bool = False
    crop_scale: tuple[float, float] = bounded((0.8, 1.0), min=0.0, max=1.0)
    crop_ratio: tuple[float, float] = bounded((3 / 4, 4 / 3), min=0.0)

    def validate(self) -> None:
        # Plain ValueError: the config loader turns it into a ConfigError prefixed with the section's key
        # (e.g. "data.image: crop_scale ...").
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale {list(self.crop_scale)} must be [low, high] with 0 < low <= high <= 1")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_ratio {list(self.crop_ratio)} must be [low, high] with 0 < low <= high")

    @property
    def is_random(self) -> bool:
        """Whether `apply` draws random numbers (and so needs seed, epoch and key)."""
        return self.hflip or self.resize == "random_resized_crop"

    def for_eval(self) -> ImagePolicy:
        """The deterministic policy for evaluation, tokenize and inspect: centre crop instead of random
        crops, no flip."""
        resize = "center_crop" if self.resize == "random_resized_crop" else self.resize
        return dataclasses.replace(self, resize=resize, hflip=False)

    def resolve(self, manifest_size: tuple[int, int] | None) -> ImagePolicy:
        """`auto` made concrete for a folder whose manifest declares `manifest_size` (None: sizes vary)."""
        if self.resize != "auto":
            return self
        return dataclasses.replace(self, resize="exact" if manifest_size is not None else "center_crop")

    def apply(
        self, image: Image.Image, size: Size, *, seed: int = 0, epoch: int = 0, key: str = "", name: str = "<image>"
    ) -> Image.Image:
        """`image` brought to `size` ((h, w) or a square side) by this (resolved) policy.

        `seed`, `epoch` and `key` (the sample's key) select the random crop and flip; `name` is what an
        "exact" size mismatch (ImageDecodeError, reason "wrong image size") calls the image.
        """
        if self.resize == "auto":
            raise ValueError("ImagePolicy.apply needs a resolved policy: call resolve(manifest_size) first")
        target = normalise_size(size)
        assert target is not None
        rng = random.Random(f"aug-{seed}-{epoch}-{key}") if self.is_random else None
        if self.resize == "exact":
            check_image_size(image, target, name)
        elif self.resize == "center_crop":
            image = center_crop(image, target)
        else:
            assert rng is not None
            image = random_resized_crop(image, target, self.crop_scale, self.crop_ratio, rng)
        if self.hflip and rng is not None and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


def center_crop(image: Image.Image, size: Size) -> Image.Image:
    """Resize so the image just covers `size` (for a square: its shorter side becomes `size`; bicubic,
    antialiased), then cut the centre. An image already at `size` is returned as is (no resampling)."""
    th, tw = normalise_size(size) or (0, 0)
    w, h = image.size
    if (h, w) == (th, tw):
        return image
    # The side that limits the scale gets exactly the target; the other is truncated like torchvision's Resize.
    if w * th >= h * tw:  # relatively wider than the target: match the heights
        new_w, new_h = max(tw, int(w * th / h)), th
    else:
        new_w, new_h = tw, max(th, int(h * tw / w))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), _RESAMPLE)
    left, top = round((new_w - tw) / 2), round((new_h - th) / 2)  # half-pixel offsets round to even
    return image.crop((left, top, left + tw, top + th))


def random_resized_crop(
    image: Image.Image,
    size: Size,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> Image.Image:
    """A crop covering a random share `scale` of the area with a random width/height in `ratio` (log-uniform),
    resized (bicubic) to `size`. After 10 draws that do not fit, the largest centred crop whose aspect
    lies within `ratio`."""
    th, tw = normalise_size(size) or (0, 0)
    w, h = image.size
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_TRIES):
        area = w * h * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))  # crop width / height
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            break
    else:
        if w / h < ratio[0]:
            cw, ch = w, min(h, round(w / ratio[0]))
        elif w / h > ratio[1]:
            cw, ch = min(w, round(h * ratio[1])), h
        else:
            cw, ch = w, h
        left, top = (w - cw) // 2, (h - ch) // 2
    return image.resize((tw, th), _RESAMPLE, box=(left, top, left + cw, top + ch))


def check_fixed_size(
    policy: ImagePolicy,
    manifest_size: tuple[int, int] | None,
    size: Size,
    *,
    shards_key: str = "data.shards",
    size_key: str = "model.image_size",
    resize_key: str = "data.image.resize",
) -> None:
    """Raise UserError up front when `policy` resolves to "exact" on a folder whose manifest fixes another
    size than `size`: every sample would be a "wrong image size" skip. The keys name the settings to fix."""
    target = normalise_size(size)
    if policy.resolve(manifest_size).resize != "exact" or manifest_size is None or manifest_size == target:
        return
    (mh, mw), (th, tw) = manifest_size, target or (0, 0)
    wanted = f"{th}" if th == tw else f"{th}x{tw}"
    raise UserError(
        f"{shards_key} holds {mh}x{mw} images (its manifest) but {size_key} is {wanted}; "
        f"render the shapes at {wanted} or set {resize_key}=center_crop"
    )
