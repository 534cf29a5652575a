"""Images a user hands to the model (files, PIL images, pixel tensors or ready token ids) -> (h, w, d) token ids.

Files go through `data/image_io.load_image` (a corrupt or missing file is one UserError line). An image
of another size is centre-cropped to a square and resized (bicubic) to the visual tokenizer's size, as
a photo would be; a pixel tensor must already have that size, since a tensor caller controls it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from os import PathLike
from typing import TYPE_CHECKING, Union

import torch
from PIL import Image
from torch import Tensor

from unicode_mllm.data.image_io import load_image, pil_to_tensor
from unicode_mllm.errors import UserError

if TYPE_CHECKING:
    from unicode_mllm.model.mllm import UniCodeMLLM

log = logging.getLogger(__name__)

# A PIL image, a file path, a (3, H, W) pixel tensor in [-1, 1], (h, w, d) LLM token ids, or None (no image).
ImageInput = Union[Image.Image, str, PathLike, Tensor, None]  # noqa: UP007 (a runtime alias: `|` fails on PathLike)

_ENCODE_CHUNK = 16  # images encoded per visual-tokenizer call: bounds memory for a long JSONL
_PIXEL_TOLERANCE = 1e-3  # pixels a little past +-1 come from float rounding, not from a [0, 255] image


def fit_to_size(image: Image.Image, size: int) -> Image.Image:
    """An RGB image -> size x size: centre crop to a square, then bicubic resize (no-op when it fits)."""
    if image.size == (size, size):
        return image
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    log.debug("image %dx%d cropped to %d and resized to %d", image.width, image.height, side, size)
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def load_image_for(model: UniCodeMLLM, path: str | PathLike) -> Image.Image:
    """Load an image file as RGB at the visual tokenizer's size. Raises UserError for a bad file."""
    return fit_to_size(load_image(path, mode="RGB"), model.visual_tokenizer.config.image_size)


def _pixels(model: UniCodeMLLM, image: Image.Image | Tensor | str | PathLike, index: int) -> Tensor:
    """One image -> (3, S, S) float32 in [-1, 1] on the CPU (the caller moves the batch)."""
    size = model.visual_tokenizer.config.image_size
    if isinstance(image, (str, PathLike)):
        image = load_image_for(model, image)
    if isinstance(image, Image.Image):
        return pil_to_tensor(fit_to_size(image.convert("RGB"), size))
    pixels = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
    if pixels.ndim != 3 or tuple(pixels.shape) != (3, size, size):
        raise UserError(f"image {index}: a pixel tensor must be (3, {size}, {size}), got {tuple(image.shape)}")
    if not pixels.is_floating_point():
        raise UserError(f"image {index}: pixel tensors must be float in [-1, 1], got {pixels.dtype}")
    low, high = float(pixels.min()), float(pixels.max())
    if low < -1 - _PIXEL_TOLERANCE or high > 1 + _PIXEL_TOLERANCE:
        raise UserError(f"image {index}: pixels span [{low:.3g}, {high:.3g}]; scale them to [-1, 1] (x / 127.5 - 1)")
    return pixels.detach().cpu().float().clamp(-1.0, 1.0)  # one CPU batch, also beside PIL inputs


def images_to_token_ids(model: UniCodeMLLM, images: Sequence[ImageInput]) -> list[Tensor | None]:
    """Each input -> (h, w, d) int64 LLM token ids on the CPU, or None where the input is None.

    Integer tensors of the code shape are taken as token ids and checked to be visual codes; all pixel
    inputs are encoded in one batch. Raises UserError for a bad file, size, range or id.
    """
    code_shape = model.code_shape
    out: list[Tensor | None] = [None] * len(images)
    pixel_rows: list[Tensor] = []
    pixel_index: list[int] = []
    for i, image in enumerate(images):
        if image is None:
            continue
        if isinstance(image, Tensor) and not image.is_floating_point():
            if tuple(image.shape) != code_shape:
                raise UserError(f"image {i}: token ids must be {code_shape} (h, w, d), got {tuple(image.shape)}")
            if not bool(model.visual_tokenizer.is_code_token_id(image.cpu()).all()):
                raise UserError(f"image {i}: token ids hold ids that are not visual codes (codes passed for ids?)")
            out[i] = image.long().cpu()
            continue
        if not isinstance(image, (Tensor, Image.Image, str, PathLike)):
            raise UserError(f"image {i}: expected a PIL image, a path, a tensor or None, got {type(image).__name__}")
        pixel_rows.append(_pixels(model, image, i))
        pixel_index.append(i)
    device = next(model.visual_tokenizer.parameters()).device
    for start in range(0, len(pixel_rows), _ENCODE_CHUNK):
        chunk = torch.stack(pixel_rows[start : start + _ENCODE_CHUNK]).to(device)  # (n, 3, S, S)
        token_ids = model.encode_images(chunk).cpu()  # (n, h, w, d)
        for i, ids in zip(pixel_index[start : start + _ENCODE_CHUNK], token_ids, strict=True):
            out[i] = ids
    return out
