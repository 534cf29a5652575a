"""Decode image files and bytes robustly, encode PNG, and convert between PIL images and tensors.

Every decoding problem a user can cause (a corrupt or truncated file, an unexpected size, a pixel mode
with no safe conversion) raises `UserError` with one line that names the file and the problem, so the
shard readers and converters can count it by reason instead of crashing on a PIL traceback.

An animated image (GIF, APNG, animated WebP) is read as its first frame, as PIL, torchvision's PIL path and
the usual dataset loaders read it; `frame_count(img)` tells the caller, so that a converter counts it as a
warning ("animated image: first frame used") rather than using it without a word.
"""

from __future__ import annotations

import io
import itertools
import warnings
from os import PathLike
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from unicode_mllm.errors import UserError

ImageSource = str | PathLike | bytes | bytearray | memoryview
TargetMode = Literal["RGB", "L"]

# 16-bit grayscale modes: rescaled to 8 bit (a lossless-in-range linear map), never clipped the way
# PIL's own convert("L") clips them to white.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Modes whose value range is not fixed: any conversion to 8 bit would have to guess a scale.
_UNSAFE_MODES = frozenset({"I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_ORIENTATION_TAG = 0x0112
_FRAMES_INFO = "unicode_mllm.frames"  # set on a decoded animated image: how many frames the file held
# Formats whose extra frames are an animation. A camera's MPO JPEG (a second, preview or depth, image) and a
# multi-page TIFF are not: their first image is the picture.
_ANIMATION_FORMATS = frozenset({"GIF", "PNG", "WEBP"})
ANIMATED_IMAGE = "animated image: first frame used"  # the warning reason converters count


class ImageDecodeError(UserError):
    """An image that cannot be decoded into the requested mode and size.

    `reason` is a short stable label ("corrupt image", "wrong image size", "unsupported image mode")
    that skip counters use as their key.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def normalise_size(expected_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """(h, w) of a size given as (h, w) or as the side of a square; None stays None."""
    if expected_size is None:
        return None
    if isinstance(expected_size, int):
        return (expected_size, expected_size)
    h, w = expected_size
    return (int(h), int(w))


def load_image(
    path_or_bytes: ImageSource,
    *,
    mode: TargetMode = "RGB",
    expected_size: int | tuple[int, int] | None = None,
    name: str | None = None,
) -> Image.Image:
    """Fully decode one image file or byte string into an 8-bit PIL image of `mode`.

    Args:
        path_or_bytes: a file path, or the encoded bytes (png, jpg, webp, bmp, ... anything PIL reads).
        mode: "RGB" (default) or "L".
        expected_size: (h, w), or an int for a square image; a mismatch is an error, never a resize.
        name: what error messages call the image (default: the path, or "<bytes>").

    Returns:
        A loaded PIL image of `mode`, EXIF orientation applied. Conversions made on the way: palette,
        1-bit, CMYK, YCbCr, LAB to `mode`; alpha composited over white; 16-bit grayscale rescaled
        to 8 bit.

    Raises:
        ImageDecodeError (a UserError) with reason "missing image" (no such file, or a folder), "corrupt image"
        (unreadable, truncated, decompression bomb), "wrong image size" or "unsupported image mode"
        (32-bit int or float pixels, whose range is unknown).

    An animated image gives its first frame; `frame_count` of the result is then above 1.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode {mode!r} is unknown; choose one of ['L', 'RGB']")
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        source = io.BytesIO(bytes(path_or_bytes))
    else:
        label = name or str(path_or_bytes)
        source = Path(path_or_bytes)
        if source.is_dir():
            raise ImageDecodeError(
                f"{label}: is a folder, not an image file; pass one image file, e.g. {_example_image(source)}",
                "missing image",
            )
        if not source.is_file():
            raise ImageDecodeError(f"{label}: image file not found; check the path", "missing image")
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) between 1x and 2x its pixel limit; treat the warning
            # like the error it becomes above 2x, so a huge image is never half-trusted.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                frames = _count_frames(img)  # counting seeks back to frame 0, which load() then decodes
                img.load()  # decode every pixel now: a truncated file fails here, not later in a worker
                img = _apply_orientation(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
        raise ImageDecodeError(
            f"{label}: image is too large to decode safely ({exn}); downscale it first", "corrupt image"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"{label}: not a readable image (unknown or corrupt format); re-export or remove it",
            "corrupt image",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exn:
        # PIL reports truncation as OSError("image file is truncated ..."), bad chunks as SyntaxError.
        detail = str(exn).splitlines()[0] if str(exn) else type(exn).__name__
        raise ImageDecodeError(
            f"{label}: corrupt or truncated image ({detail}); re-export or remove it", "corrupt image"
        ) from None

    img = _to_mode(img, mode, label)
    check_image_size(img, expected_size, label)
    if frames > 1:
        img.info[_FRAMES_INFO] = frames
    return img


def _count_frames(img: Image.Image) -> int:
    if img.format not in _ANIMATION_FORMATS:
        return 1
    try:
        return int(getattr(img, "n_frames", 1))
    except Exception as exn:  # a truncated later frame fails PIL's frame walk in many ways (IndexError, ...)
        raise OSError(f"a frame after the first is unreadable ({type(exn).__name__})") from None


def frame_count(img: Image.Image) -> int:
    """How many frames the file of an image from `load_image` held (1 unless it was animated)."""
    return int(img.info.get(_FRAMES_INFO, 1))


def _example_image(folder: Path) -> str:
    """An image file in `folder` to name in the message (a look at its first few hundred entries), or a pattern."""
    suffixes = Image.registered_extensions()
    try:
        for entry in itertools.islice(folder.iterdir(), 500):
            if entry.suffix.lower() in suffixes and entry.is_file():
                return str(entry)
    except OSError:  # an unreadable folder: the pattern still says what to pass
        pass
    return str(folder / "IMAGE.png")


def check_image_size(img: Image.Image, expected_size: int | tuple[int, int] | None, label: str) -> None:
    """Raise ImageDecodeError (reason "wrong image size") unless `img` is `expected_size` ((h, w) or a square
    side; None accepts any size)."""
    expected_hw = normalise_size(expected_size)
    if expected_hw is not None and (img.height, img.width) != expected_hw:
        raise ImageDecodeError(
            f"{label}: image is {img.height}x{img.width} (h x w) but {expected_hw[0]}x{expected_hw[1]} "
            "was expected; resize the data or change the expected size",
            "wrong image size",
        )


def _apply_orientation(img: Image.Image) -> Image.Image:
    # Only pay for a transpose copy when the EXIF orientation actually asks for one.
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block is not a broken image: keep the pixels as stored
        return img
    if orientation in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def _to_mode(img: Image.Image, mode: TargetMode, label: str) -> Image.Image:
    src = img.mode
    if src == mode:
        return img
    if src in _UNSAFE_MODES:
        raise ImageDecodeError(
            f"{label}: pixel mode {src!r} (32-bit int or float) has no fixed range to map to 8 bit; "
            "convert the file to 8-bit RGB first",
            "unsupported image mode",
        )
    if src in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.uint32)
        img = Image.fromarray((arr >> 8).astype(np.uint8))  # (h, w) uint8 -> "L"
        return img if mode == "L" else img.convert(mode)
    if src == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        src = "RGBA"
    if src in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
        return img if mode == "RGB" else img.convert(mode)
    try:
        return img.convert(mode)  # 1, L, P, CMYK (PIL's profile-free formula), YCbCr, LAB, HSV
    except ValueError as exn:
        raise ImageDecodeError(
            f"{label}: cannot convert pixel mode {src!r} to {mode} ({exn}); convert the file to RGB first",
            "unsupported image mode",
        ) from None


def encode_png(img: Image.Image) -> bytes:
    """Encode a PIL image as PNG bytes (lossless; the pixels decode back exactly)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert an RGB PIL image to a float32 tensor (3, h, w) with values in [-1, 1].

    Raises ValueError when the image is not RGB (decode with `load_image(..., mode="RGB")` first).
    """
    if img.mode != "RGB":
        raise ValueError(f"pil_to_tensor needs an RGB image, got mode {img.mode!r}; load it with mode='RGB'")
    arr = np.asarray(img, dtype=np.uint8)  # (h, w, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()  # (3, h, w) in [0, 255]
    return x / 127.5 - 1.0


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Convert a tensor (3, h, w) with values in [-1, 1] back to an RGB PIL image.

    Values are clamped to [-1, 1] and rounded to the nearest 8-bit level, so
    `tensor_to_pil(pil_to_tensor(img))` reproduces `img` exactly. Raises ValueError on other shapes.
    """
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"tensor_to_pil needs a (3, h, w) tensor, got shape {tuple(x.shape)}")
    levels = ((x.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(levels.permute(1, 2, 0).numpy())  # (h, w, 3) uint8 -> "RGB"
