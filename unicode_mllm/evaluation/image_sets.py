"""The image sets a visual tokenizer is evaluated on: a split of a shard folder, an image folder, or photos.

Every image is centre-cropped to a square and resized (bicubic) to the tokenizer's size with
`visual_tokenizer.reconstruct.fit_square`, the same preparation as `unicode-mllm reconstruct`; an image
that already has that size is used as it is. Images that cannot be used are counted by reason in a
`SkipCounts` (corrupt or missing files, dangling symlinks and symlink loops, undecodable shard samples,
text-only shard samples, photos whose loader fails), never dropped silently. An animated image is used by its
first frame (`data.image_io.load_image`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from unicode_mllm.data.image_io import ImageDecodeError, load_image
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation.photos import PHOTO_NAMES, load_photos
from unicode_mllm.evaluation.skips import SkipCounts, shard_images
from unicode_mllm.visual_tokenizer.reconstruct import fit_square

IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
SYMLINK_LOOP = "symlink loop"
MISSING_IMAGE = "missing image"  # load_image's reason for a file that is not there
PHOTO_UNAVAILABLE = "photo unavailable"

ImageSetKind = Literal["shards", "folder", "photos"]


@dataclass(frozen=True)
class NamedImage:
    name: str  # "shard.tar:key", the path relative to the folder, or the photo name
    image: Image.Image  # RGB, size x size
    original_size: tuple[int, int]  # (w, h) before fitting
    scene: dict[str, Any] | None = None  # the shapes world's scene of the image (shards of `data shapes`), if any


@dataclass(frozen=True)
class ImageSet:
    """Where the images come from. Build with `ImageSet.shards`, `ImageSet.folder` or `ImageSet.photos`."""

    kind: ImageSetKind
    path: Path | None = None
    split: str | None = None
    photo_names: tuple[str, ...] | None = None

    @classmethod
    def shards(cls, data_dir: str | Path, split: str) -> ImageSet:
        return cls("shards", path=Path(data_dir), split=split)

    @classmethod
    def folder(cls, folder: str | Path) -> ImageSet:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"image folder {folder} not found; pass an existing directory")
        return cls("folder", path=folder)

    @classmethod
    def photos(cls, names: tuple[str, ...] | list[str] | None = None) -> ImageSet:
        """scikit-image's sample photos (`evaluation.photos.PHOTO_NAMES` unless `names` is given)."""
        return cls("photos", photo_names=tuple(names) if names is not None else None)

    def describe(self) -> dict[str, Any]:
        """JSON-safe description of the set (the evaluators add the names of the images they used)."""
        if self.kind == "shards":
            return {"kind": "shards", "data_dir": str(self.path), "split": self.split}
        if self.kind == "folder":
            return {"kind": "folder", "folder": str(self.path)}
        return {"kind": "photos", "source": "skimage.data", "requested": list(self.photo_names or PHOTO_NAMES)}

    def iter(self, size: int, skips: SkipCounts) -> Iterator[NamedImage]:
        """Yield the set's usable images fitted to size x size, counting the rest in `skips`."""
        sources = {"shards": self._iter_shards, "folder": self._iter_folder, "photos": self._iter_photos}
        for name, image, scene in sources[self.kind](skips):
            yield NamedImage(name, fit_square(image, size), image.size, scene)

    def _iter_shards(self, skips: SkipCounts) -> Iterator[tuple[str, Image.Image, dict[str, Any] | None]]:
        from unicode_mllm.data.stream import StreamingDataset

        assert self.path is not None and self.split is not None, "ImageSet.shards sets path and split"
        stream = StreamingDataset.from_folder(self.path, self.split, shuffle=False, image_format="pil")
        for name, sample in shard_images(stream, skips):
            scene = sample["meta"].get("scene")
            yield name, sample["image"], scene if isinstance(scene, dict) else None

    def _iter_folder(self, skips: SkipCounts) -> Iterator[tuple[str, Image.Image, None]]:
        assert self.path is not None, "ImageSet.folder sets path"
        # A link that leads nowhere (dangling, or round in a loop) is not a file, but it is listed and counted.
        files = sorted(
            p
            for p in self.path.rglob("*")
            if p.suffix.lower() in IMAGE_FILE_SUFFIXES and (p.is_file() or (p.is_symlink() and not p.exists()))
        )
        if not files:
            raise UserError(f"image folder {self.path} holds no {'/'.join(IMAGE_FILE_SUFFIXES)} files")
        for path in files:
            name = str(path.relative_to(self.path))
            broken = _broken_link(path)
            if broken is not None:
                skips.skip(broken[0], name, f"{name}: {broken[1]}; fix or remove the link")
                continue
            try:
                image = load_image(path, mode="RGB", name=name)
            except ImageDecodeError as exn:
                skips.skip(exn.reason, name, str(exn))
                continue
            yield name, image, None

    def _iter_photos(self, skips: SkipCounts) -> Iterator[tuple[str, Image.Image, None]]:
        photos, unavailable = load_photos(self.photo_names)
        for name, why in unavailable.items():
            skips.skip(PHOTO_UNAVAILABLE, name, f"photo {name}: {why}")
        for photo in photos:
            yield photo.name, photo.image, None


def _broken_link(path: Path) -> tuple[str, str] | None:
    """(reason, what) for a symlink that leads to no file: round in a loop, or to a path that is not there."""
    if not path.is_symlink() or path.exists():
        return None
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return SYMLINK_LOOP, f"symlink loop ({path.name} -> {os.readlink(path)} -> ... leads back to itself)"
    return MISSING_IMAGE, f"dangling symlink to {os.readlink(path)}"
