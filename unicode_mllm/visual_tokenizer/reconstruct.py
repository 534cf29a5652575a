"""Reconstruct image files through a trained tokenizer and measure PSNR (and LPIPS when a trunk exists).

Every readable file is reconstructed; the unreadable ones are collected with their reason (`ReconstructionReport`)
instead of ending the run at the first, so the caller reports both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from unicode_mllm.data.image_io import ImageDecodeError, load_image, pil_to_tensor, tensor_to_pil
from unicode_mllm.data.image_policy import center_crop
from unicode_mllm.errors import UserError
from unicode_mllm.image_metrics import psnr
from unicode_mllm.runtime.devices import select_device
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

if TYPE_CHECKING:
    from unicode_mllm.perceptual import PerceptualLoss


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """size x size by the data pipeline's centre crop (`image_policy.center_crop`: shorter side resized to
    `size`, bicubic, then the centre cut), so a file is prepared exactly like a training photo."""
    return center_crop(image, size)


def load_perceptual(lpips_trunk: str | None, device: str | torch.device = "cpu") -> tuple[PerceptualLoss | None, str]:
    """(LPIPS module or None, a note saying what was loaded or why nothing was).

    `lpips_trunk`: "auto" (torchvision's cache file), a file path, "random" (an explicit random trunk,
    whose values are not LPIPS) or None (do not measure). A missing trunk file gives (None, "not
    measured: ..."): callers report LPIPS as not measured, never as a number.
    """
    if lpips_trunk is None:
        return None, "not measured: no trunk requested"
    from unicode_mllm.perceptual import PerceptualLoss, resolve_trunk

    try:
        path = resolve_trunk(lpips_trunk)
        perceptual = PerceptualLoss(lpips_trunk).to(device)
    except UserError as exn:
        return None, f"not measured: {exn}"
    note = "random VGG16 trunk (explicitly requested; values are not LPIPS)" if path is None else f"VGG16 trunk {path}"
    return perceptual, note


@torch.no_grad()
def reconstruct_batch(tokenizer: VisualTokenizer, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, 3, H, W) in [-1, 1] -> (codes (b, h, w, d) int64, reconstruction (b, 3, H, W) in [-1, 1])."""
    codes = tokenizer.encode(pixel_values)
    return codes, tokenizer.decode(codes)


def side_by_side(original: Image.Image, reconstruction: torch.Tensor) -> Image.Image:
    """original | reconstruction as one RGB image; reconstruction is (3, H, W) in [-1, 1]."""
    rec = tensor_to_pil(reconstruction.cpu())
    pair = Image.new("RGB", (original.width + rec.width, max(original.height, rec.height)))
    pair.paste(original.convert("RGB"), (0, 0))
    pair.paste(rec, (original.width, 0))
    return pair


@dataclass
class Reconstruction:
    source: Path
    output: Path
    psnr: float
    lpips: float | None


@dataclass
class Unreadable:
    """An input file that could not be decoded: `reason` is the short label ("corrupt image"), `message` the
    one-line explanation."""

    source: Path
    reason: str
    message: str


@dataclass
class ReconstructionReport:
    """What `reconstruct_files` did: the reconstructed files (in input order) and the unreadable ones."""

    done: list[Reconstruction] = field(default_factory=list)
    failed: list[Unreadable] = field(default_factory=list)

    def summary(self) -> str:
        """One line, e.g. "reconstructed 9 of 10 files; could not read 1: x.jpg (corrupt image)"."""
        total = len(self.done) + len(self.failed)
        text = f"reconstructed {len(self.done)} of {total} file{'s' if total != 1 else ''}"
        if self.failed:
            named = ", ".join(f"{f.source} ({f.reason})" for f in self.failed)
            text += f"; could not read {len(self.failed)}: {named}"
        return text


def output_paths(paths: list[Path], out_dir: str | Path) -> list[Path]:
    """One distinct output per input: `{stem}_recon.png`; inputs sharing a stem add their extension
    (`x_jpg_recon.png`), and inputs sharing both (same name, other folders) a number (`x_png_2_recon.png`)."""
    stems = [Path(p).stem for p in paths]
    names = []
    for path, stem in zip(paths, stems, strict=True):
        ext = Path(path).suffix.lstrip(".").lower()
        names.append(f"{stem}_{ext}" if stems.count(stem) > 1 and ext else stem)
    used: set[str] = set()
    out = []
    for name in names:
        unique, n = name, 1
        while unique in used:  # never two inputs on one file: the later one would silently replace the first
            n += 1
            unique = f"{name}_{n}"
        used.add(unique)
        out.append(Path(out_dir) / f"{unique}_recon.png")
    return out


def reconstruct_files(
    tokenizer_dir: str | Path,
    paths: list[Path],
    out_dir: str | Path,
    lpips_trunk: str | None = "auto",
    device: str | torch.device = "auto",
) -> ReconstructionReport:
    """Write `out_dir/{stem}_recon.png` (original | reconstruction) for each readable image file (names:
    `output_paths`); a file that cannot be decoded is listed in the report's `failed`, never ends the run."""
    device = select_device(device)  # "auto" -> cuda, mps or cpu
    tokenizer = VisualTokenizer.from_pretrained(str(tokenizer_dir)).to(device).eval()
    perceptual, _ = load_perceptual(lpips_trunk, device)  # None is reported as n/a by the caller, never a number
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = tokenizer.config.image_size
    report = ReconstructionReport()
    for path, output in zip(paths, output_paths(paths, out_dir), strict=True):
        try:
            image = fit_square(load_image(path), size)
        except ImageDecodeError as exn:
            report.failed.append(Unreadable(Path(path), exn.reason, str(exn)))
            continue
        x = pil_to_tensor(image)[None].to(device)
        _, rec = reconstruct_batch(tokenizer, x)
        with torch.no_grad():
            lp = float(perceptual(x, rec)[0]) if perceptual is not None else None
        pair = side_by_side(image, rec[0])
        pair.save(output)
        report.done.append(Reconstruction(Path(path), output, float(psnr(x, rec)[0]), lp))
    return report
