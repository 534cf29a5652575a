"""Pre-extract codes once (`unicode-mllm tokenize`): shards in, shards out with LLM token ids added.

Each image sample is brought to the tokenizer's size by the evaluation image policy (exact for shapes,
centre crop for photos of other sizes; `unicode_mllm.data.image_policy`), stored as that processed image
(the one its codes describe) with its metadata, and gains `visual_token_ids` (h*w*d LLM token ids in
raster order, depth-first per position) and `code_shape` [h, w, d], so stage 2 trains without running
the tokenizer. Text-only samples (no image) are copied unchanged; a batch may mix both.

Samples the reader skips (a corrupt image, an image of another size under the exact policy, a broken shard)
are counted per split by reason in the output manifest's `extra.tokenize` (`skipped`, `broken_shards`), as the
converters count theirs under `extra.conversion`: the data keeps its own record of what was left out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from unicode_mllm.data.image_io import tensor_to_pil
from unicode_mllm.data.image_policy import ImagePolicy
from unicode_mllm.data.shards import write_manifest, write_split
from unicode_mllm.data.stream import SkipReport, StreamingDataset, collate
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.devices import select_device
from unicode_mllm.shard_manifest import SplitSummary, read_manifest
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

TOKEN_IDS_KEY = "visual_token_ids"
CODE_SHAPE_KEY = "code_shape"
FINGERPRINT_KEY = "visual_tokenizer_fingerprint"  # VisualTokenizer.encoding_fingerprint() of the writer


def _records(
    tokenizer: VisualTokenizer, loader: DataLoader, report: SkipReport, device: torch.device, fingerprint: str
) -> Iterator[dict[str, Any]]:
    for batch in report.track(loader):
        if not batch["key"]:
            continue
        # `collate` stacks a batch of images into (b, 3, H, W) but leaves a list when a text-only sample
        # (image None) is in it: either way one (3, H, W) tensor or None per sample.
        images: list[torch.Tensor | None] = list(batch["image"])
        with_image = [i for i, x in enumerate(images) if x is not None]
        token_ids: dict[int, torch.Tensor] = {}
        if with_image:
            pixels = torch.stack([images[i] for i in with_image]).to(device)  # (n, 3, H, W)
            codes = tokenizer.codes_to_token_ids(tokenizer.encode(pixels)).cpu()  # (n, h, w, d)
            token_ids = dict(zip(with_image, codes, strict=True))
        for i, (key, image, meta) in enumerate(zip(batch["key"], images, batch["meta"], strict=True)):
            if image is None:  # text-only: copied as read, without codes (stale ones of a re-tokenize dropped)
                kept = {k: v for k, v in meta.items() if k not in (TOKEN_IDS_KEY, CODE_SHAPE_KEY, FINGERPRINT_KEY)}
                yield {"key": key, "image": None, "meta": kept}
                continue
            ids = token_ids[i]  # (h, w, d)
            yield {
                "key": key,
                "image": tensor_to_pil(image),
                "meta": {
                    **meta,
                    TOKEN_IDS_KEY: ids.flatten().tolist(),
                    CODE_SHAPE_KEY: list(ids.shape),
                    FINGERPRINT_KEY: fingerprint,
                },
            }


def extract_codes(
    tokenizer_dir: str | Path,
    shards: str | Path,
    out_dir: str | Path,
    splits: Sequence[str] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    overwrite: bool = False,
    image_policy: ImagePolicy | None = None,
) -> dict[str, SplitSummary]:
    """Encode every image of `splits` (default: all) and write them with their token ids to `out_dir`.

    Images reach the tokenizer's size by `image_policy.for_eval()` (default `ImagePolicy()`: exact when the
    manifest fixes a size, else centre crop); text-only samples are written unchanged, without codes.
    """
    device = select_device(device)  # "auto" -> cuda, mps or cpu
    tokenizer = VisualTokenizer.from_pretrained(str(tokenizer_dir)).to(device).eval()
    manifest = read_manifest(shards)
    names = list(splits) if splits else sorted(manifest.splits)
    unknown = [s for s in names if s not in manifest.splits]
    if unknown:
        raise UserError(f"splits {unknown} are not in {shards}; available: {sorted(manifest.splits)}")
    summaries = {}
    skipped: dict[str, dict[str, int]] = {}
    broken_shards: dict[str, list[str]] = {}
    size = tokenizer.config.image_size
    policy = (image_policy or ImagePolicy()).for_eval()  # never a random crop: codes must be reproducible
    fixed = manifest.image_size()
    if policy.resolve(fixed).resize == "exact" and fixed is not None and fixed != (size, size):
        raise UserError(
            f"{shards} holds {fixed[0]}x{fixed[1]} images (its manifest) but the tokenizer {tokenizer_dir} codes "
            f"{size}x{size} images; use a tokenizer trained at {fixed[0]}x{fixed[1]} or render the data at {size}"
        )
    fingerprint = tokenizer.encoding_fingerprint()  # hashes the encoder and codebook once per run
    for split in names:
        dataset = StreamingDataset(
            shards, split, shuffle=False, image_format="tensor", image_size=size, image_policy=policy
        )
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
        report = SkipReport()
        summaries[split] = write_split(
            _records(tokenizer, loader, report, device, fingerprint),
            out_dir,
            split,
            overwrite=overwrite,
            total=manifest.split(split).num_samples,
        )
        skipped[split] = dict(report.skipped)
        broken_shards[split] = list(report.broken_shards)
    write_manifest(
        out_dir,
        summaries.values(),
        {
            "generator": "tokenize",
            "tokenizer": str(tokenizer_dir),
            "code_shape": list(tokenizer.code_shape),
            FINGERPRINT_KEY: fingerprint,
            "source": str(shards),
            "source_generator": manifest.generator_config,
        },
        extra={"tokenize": {"skipped": skipped, "broken_shards": broken_shards}},
    )
    return summaries
