"""Out-of-domain real photos for reconstruction checks: the sample images that ship inside scikit-image.

scikit-image is a test dependency (`pip install scikit-image`), not a runtime one, so it is imported
only when photos are asked for. Its `skimage.data` loaders read files bundled with the package (no
download) for the names below; a name whose loader fails in an installation (some versions fetch
files with `pooch`) is reported as unavailable, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from unicode_mllm.errors import UserError

# Natural photographs and scientific images, colour first; grayscale ones are replicated to RGB.
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
    "clock",
    "moon",
)


@dataclass(frozen=True)
class Photo:
    name: str
    image: Image.Image  # RGB at the photo's own size


def _to_rgb(array: np.ndarray, name: str) -> Image.Image:
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name}() gave dtype {array.dtype}; expected uint8")
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.ndim == 3 and array.shape[2] == 4:
        return Image.fromarray(array, mode="RGBA").convert("RGB")
    if array.ndim == 3 and array.shape[2] == 3:
        return Image.fromarray(array, mode="RGB")
    raise ValueError(f"skimage.data.{name}() gave an array of shape {array.shape}; expected (h, w) or (h, w, 3|4)")


def load_photos(names: tuple[str, ...] | list[str] | None = None) -> tuple[list[Photo], dict[str, str]]:
    """The named photos as RGB PIL images, and {name: why} for those that could not be loaded.

    `names` defaults to `PHOTO_NAMES`. Raises UserError when scikit-image is not installed or a name
    is not a loader of `skimage.data`.
    """
    try:
        import skimage.data
    except ImportError:
        raise UserError("the photo set needs scikit-image; install it with `pip install scikit-image`") from None
    names = tuple(names) if names is not None else PHOTO_NAMES
    photos, unavailable = [], {}
    for name in names:
        loader = getattr(skimage.data, name, None)
        if name.startswith("_") or not callable(loader):
            raise UserError(f"{name!r} is not an image of skimage.data; choose from {list(PHOTO_NAMES)}")
        try:
            array = np.asarray(loader())
            photos.append(Photo(name, _to_rgb(array, name)))
        except Exception as exn:  # a loader that needs a download or an optional package: report, do not crash
            unavailable[name] = f"{type(exn).__name__}: {' '.join(str(exn).split())[:200]}"
    return photos, unavailable
