"""Pre-extract codes once (`unicode-mllm tokenize`): shards in, shards out with LLM token ids added.

Each output sample keeps its image and metadata and gains `visual_token_ids` (h*w*d LLM token ids in
raster order, depth-first per position) and `code_shape` [h, w, d], so stage 2 trains without running
the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from unicode_mllm.data.image_io import tensor_to_pil
from unicode_mllm.data.shards import SplitSummary, read_manifest, write_manifest, write_split
from unicode_mllm.data.stream import SkipReport, StreamingDataset, collate
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.devices import select_device
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
        images = batch["image"].to(device)
        token_ids = tokenizer.codes_to_token_ids(tokenizer.encode(images)).cpu()  # (b, h, w, d)
        for key, image, meta, ids in zip(batch["key"], batch["image"], batch["meta"], token_ids, strict=True):
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
) -> dict[str, SplitSummary]:
    """Encode every image of `splits` (default: all) and write them with their token ids to `out_dir`."""
    device = select_device(device)  # "auto" -> cuda, mps or cpu
    tokenizer = VisualTokenizer.from_pretrained(str(tokenizer_dir)).to(device).eval()
    manifest = read_manifest(shards)
    names = list(splits) if splits else sorted(manifest.splits)
    unknown = [s for s in names if s not in manifest.splits]
    if unknown:
        raise UserError(f"splits {unknown} are not in {shards}; available: {sorted(manifest.splits)}")
    summaries = {}
    size = tokenizer.config.image_size
    fingerprint = tokenizer.encoding_fingerprint()  # hashes the encoder and codebook once per run
    for split in names:
        dataset = StreamingDataset(shards, split, shuffle=False, image_format="tensor", expected_size=size)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
        report = SkipReport()
        summaries[split] = write_split(
            _records(tokenizer, loader, report, device, fingerprint),
            out_dir,
            split,
            overwrite=overwrite,
            total=manifest.split(split).num_samples,
        )
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
    )
    return summaries
