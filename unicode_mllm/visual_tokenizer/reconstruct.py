"""Reconstruct image files through a trained tokenizer and measure PSNR (and LPIPS when a trunk exists)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from unicode_mllm.data.image_io import load_image, pil_to_tensor, tensor_to_pil
from unicode_mllm.errors import UserError
from unicode_mllm.image_metrics import psnr
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize (bicubic) to size x size."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.Resampling.BICUBIC)


@dataclass
class Reconstruction:
    source: Path
    output: Path
    psnr: float
    lpips: float | None


def reconstruct_files(
    tokenizer_dir: str | Path,
    paths: list[Path],
    out_dir: str | Path,
    lpips_trunk: str | None = "auto",
    device: str = "cpu",
) -> list[Reconstruction]:
    """Write `out_dir/{stem}_recon.png` (original | reconstruction) for each image file."""
    tokenizer = VisualTokenizer.from_pretrained(str(tokenizer_dir)).to(device).eval()
    perceptual = None
    if lpips_trunk is not None:
        from tokenizer_training.perceptual import PerceptualLoss

        try:
            perceptual = PerceptualLoss(lpips_trunk).to(device)
        except UserError:
            perceptual = None  # reported as n/a by the caller, never as a number
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = tokenizer.config.image_size
    results = []
    for path in paths:
        image = fit_square(load_image(path), size)
        x = pil_to_tensor(image)[None].to(device)
        with torch.no_grad():
            rec = tokenizer.decode(tokenizer.encode(x))
            lp = float(perceptual(x, rec)[0]) if perceptual is not None else None
        pair = Image.new("RGB", (2 * size, size))
        pair.paste(image, (0, 0))
        pair.paste(tensor_to_pil(rec[0].cpu()), (size, 0))
        output = out_dir / f"{Path(path).stem}_recon.png"
        pair.save(output)
        results.append(Reconstruction(Path(path), output, float(psnr(x, rec)[0]), lp))
    return results
