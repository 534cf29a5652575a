"""The captioned real images that text-to-image FID is measured against: (caption, image) pairs, in a fixed order.

Three sources, read the same way every run (no shuffling, no randomness):

* COCO captions in the official layout (`captions_val2017.json` + `val2017/`): the images in the order of the
  file's "images" list, each with its first caption in annotation order. That is what `data from-coco`
  stores as `caption`, so a converted folder yields the same pairs in the same order.
* a shard folder whose samples carry `caption` (or `captions`, the first is used): `data from-coco`,
  `data from-folder` with caption sidecars; samples in manifest order.
* an img2dataset folder (`00000.tar` with `.jpg`/`.txt`/`.json`), read as shards by `StreamingDataset`; the
  `.txt` member is the caption.

Every image is brought to the generator's `size` x `size` by the data pipeline's centre crop
(`image_policy.center_crop`: shorter side to `size`, bicubic, centre cut; an image already at that size is
untouched), so real and generated images are compared at one resolution (see `evaluation.fid`). Items that
cannot be used are counted by reason in a `SkipCounts` (missing or corrupt image, no caption, text-only
sample), never dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from unicode_mllm.data.image_io import ImageDecodeError, load_image
from unicode_mllm.data.image_policy import ImagePolicy, center_crop
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation.skips import SkipCounts, shard_images

NO_CAPTION = "no caption"


@dataclass(frozen=True)
class CaptionedImage:
    name: str  # the COCO file name, or "shard.tar:key"
    caption: str
    image: Image.Image  # RGB, size x size


def _first_caption(meta: dict[str, Any]) -> str | None:
    """`caption`, else the first non-empty string of `captions` (stripped); None when there is none."""
    caption = meta.get("caption")
    if isinstance(caption, str) and caption.strip():
        return caption.strip()
    captions = meta.get("captions")
    if isinstance(captions, list):
        return next((c.strip() for c in captions if isinstance(c, str) and c.strip()), None)
    return None


@dataclass(frozen=True)
class CaptionSet:
    """Where the pairs come from. Build with `CaptionSet.coco` or `CaptionSet.shards`."""

    kind: Literal["coco", "shards"]
    path: Path  # the captions JSON file (coco) or the shard folder
    images: Path | None = None  # coco: the image folder
    split: str | None = None  # shards: the split read

    @classmethod
    def coco(cls, captions_json: str | Path, image_root: str | Path) -> CaptionSet:
        path, root = Path(captions_json), Path(image_root)
        if not path.is_file():
            raise UserError(f"--captions {path} not found; pass a COCO captions file such as captions_val2017.json")
        if not root.is_dir():
            raise UserError(f"--images {root} is not a folder; pass the folder that holds the COCO images (val2017/)")
        return cls("coco", path, images=root)

    @classmethod
    def shards(cls, data_dir: str | Path, split: str | None = None) -> CaptionSet:
        """A shard or img2dataset folder; `split` defaults to `val` when the folder has it, else its only split."""
        from unicode_mllm.shard_manifest import read_manifest

        manifest = read_manifest(data_dir)
        if split is None:
            names = sorted(manifest.splits)
            if "val" in names:
                split = "val"
            elif len(names) == 1:
                split = names[0]
            else:
                raise UserError(f"{manifest.location} has splits {names} and no 'val'; pick one with --split")
        manifest.split(split)  # UserError listing the splits when absent
        return cls("shards", Path(data_dir), split=split)

    @property
    def name(self) -> str:
        """A short name for output files: the captions file's stem, or the folder's name and split."""
        return self.path.stem if self.kind == "coco" else f"{self.path.name}-{self.split}"

    def describe(self) -> dict[str, Any]:
        """JSON-safe description with the data files (absolute paths) and the selection rule."""
        if self.kind == "coco":
            return {
                "kind": "coco",
                "captions": str(self.path.resolve()),
                "images": str(self.images.resolve()) if self.images else None,
                "selection": "images in file order, first caption of each in annotation order",
            }
        return {
            "kind": "shards",
            "data_dir": str(self.path.resolve()),
            "split": self.split,
            "selection": "samples in manifest order, meta caption (else the first of captions)",
        }

    def iter(self, size: int, skips: SkipCounts) -> Iterator[CaptionedImage]:
        """Yield the usable pairs with images centre-cropped to size x size, counting the rest in `skips`."""
        yield from self._iter_coco(size, skips) if self.kind == "coco" else self._iter_shards(size, skips)

    def _iter_coco(self, size: int, skips: SkipCounts) -> Iterator[CaptionedImage]:
        assert self.images is not None, "CaptionSet.coco sets images"
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exn:
            raise UserError(f"{self.path}: not a UTF-8 JSON file ({exn}); pass a COCO captions file") from None
        images = data.get("images") if isinstance(data, dict) else None
        annotations = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(images, list) or not isinstance(annotations, list):
            raise UserError(f"{self.path}: no 'images' and 'annotations' lists; is this a COCO captions file?")
        first: dict[int, str] = {}  # image id -> its first caption (annotation order)
        for entry in annotations:
            if isinstance(entry, dict) and isinstance(entry.get("image_id"), int):
                caption = entry.get("caption")
                if isinstance(caption, str) and caption.strip() and entry["image_id"] not in first:
                    first[entry["image_id"]] = caption.strip()
        for index, entry in enumerate(images):
            image_id = entry.get("id") if isinstance(entry, dict) else None
            file_name = entry.get("file_name") if isinstance(entry, dict) else None
            if not isinstance(image_id, int) or not isinstance(file_name, str) or not file_name:
                skips.skip(
                    "malformed entry", f"images[{index}]", f"{self.path.name}: images[{index}] has no id/file_name"
                )
                continue
            caption = first.get(image_id)
            if caption is None:
                skips.skip(NO_CAPTION, file_name, f"{file_name}: image {image_id} has no caption in {self.path.name}")
                continue
            try:
                image = load_image(self.images / file_name, mode="RGB", name=file_name)
            except ImageDecodeError as exn:
                skips.skip(exn.reason, file_name, str(exn))
                continue
            yield CaptionedImage(file_name, caption, center_crop(image, size))

    def _iter_shards(self, size: int, skips: SkipCounts) -> Iterator[CaptionedImage]:
        from unicode_mllm.data.stream import StreamingDataset

        assert self.split is not None, "CaptionSet.shards sets split"
        policy = ImagePolicy(resize="center_crop")
        stream = StreamingDataset(
            self.path, self.split, shuffle=False, image_format="pil", image_size=size, image_policy=policy
        )
        for name, sample in shard_images(stream, skips):
            caption = _first_caption(sample["meta"])
            if caption is None:
                skips.skip(NO_CAPTION, name, f"{name}: sample has no caption or captions")
                continue
            yield CaptionedImage(name, caption, sample["image"])
