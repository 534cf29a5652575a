"""Evaluate a visual tokenizer on an image set: PSNR, SSIM, LPIPS, rFID, per-depth code usage and, on shapes
shards, scene fidelity (the shapes analyser reads each reconstruction back and scores it against the
image's scene: whether shapes, colours and positions survive tokenization; the ceiling of text-to-image).

The per-image work is `unicode-mllm reconstruct`'s (`visual_tokenizer.reconstruct`: `fit_square`,
`reconstruct_batch`, `load_perceptual`, `side_by_side`), batched. LPIPS is measured only with a real
VGG16 trunk (`lpips_trunk="auto"` finds torchvision's cache file, or pass a path); without one it is
reported as not measured with the reason. A random trunk is used only when asked for by name
(`lpips_trunk="random"`, for tests), and the result then says so next to the number.

rFID (the reconstruction FID of tokenizer papers, `evaluation.fid`): FID of the reconstructions against the
originals, both at the tokenizer's size, with the FID Inception network (`rfid="inception"`), measured when
its weights file is found (or given as `inception_weights`) and otherwise reported as not measured with the
reason, like LPIPS. `rfid="random-for-tests"` or a `FeatureExtractor` uses another network, and the result
then says that the value is not FID.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from unicode_mllm.data.image_io import pil_to_tensor, tensor_to_pil
from unicode_mllm.data.shapes import Scene, ShapesConfig, ShapesScore, score
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation.code_usage import CodeUsage
from unicode_mllm.evaluation.fid import DistributionMetrics, DistributionScores, FeatureExtractor, try_feature_extractor
from unicode_mllm.evaluation.image_sets import ImageSet, NamedImage
from unicode_mllm.evaluation.item_batches import run_in_batches
from unicode_mllm.evaluation.skips import SkipCounts
from unicode_mllm.evaluation.ssim import ssim
from unicode_mllm.evaluation.t2i import shapes_config_from_manifest
from unicode_mllm.image_metrics import psnr
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer
from unicode_mllm.visual_tokenizer.reconstruct import load_perceptual, reconstruct_batch, side_by_side
from unicode_mllm.viz import caption_grid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageScores:
    name: str
    psnr: float  # dB on the [0, 1] scale
    ssim: float
    lpips: float | None  # None when LPIPS was not measured

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "psnr": self.psnr, "ssim": self.ssim, "lpips": self.lpips}


@dataclass(frozen=True)
class SceneFidelity:
    """Shapes-analyser scores of reconstructions (and of the originals, the analyser's own ceiling).

    Fractions as `shapes.score`: per image over its objects, then the mean over images; `overall` is the
    share of images whose every object keeps shape, colour and position, with the right object count.
    """

    num_images: int
    shape: float
    colour: float
    position: float
    size: float
    overall: float
    originals_overall: float

    @classmethod
    def from_scores(cls, reconstructed: list[ShapesScore], originals: list[ShapesScore]) -> SceneFidelity:
        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        return cls(
            num_images=len(reconstructed),
            shape=mean([r.shape for r in reconstructed]),
            colour=mean([r.colour for r in reconstructed]),
            position=mean([r.position for r in reconstructed]),
            size=mean([r.size for r in reconstructed]),
            overall=mean([float(r.overall) for r in reconstructed]),
            originals_overall=mean([float(r.overall) for r in originals]),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TokenizerEvalResult:
    """Scores of one visual tokenizer on one image set; `to_dict()` is the JSON report."""

    tokenizer: str
    source: dict[str, Any]
    image_size: int
    code_shape: tuple[int, int, int]
    per_image: list[ImageScores]
    usage: CodeUsage
    lpips_note: str  # which trunk measured LPIPS, or why it was not measured
    lpips_is_random_trunk: bool
    skips: SkipCounts
    num_resized: int  # images that were centre-cropped and/or resized to image_size
    grid_path: Path | None = None
    scene_fidelity: SceneFidelity | None = None  # shapes shards only (every image carries its scene)
    rfid: DistributionScores | None = None  # reconstructions vs originals, when measured
    rfid_note: str = "not measured: not requested"  # the extractor used, or why rFID was not measured

    @property
    def num_images(self) -> int:
        return len(self.per_image)

    @property
    def psnr(self) -> float:
        return sum(s.psnr for s in self.per_image) / self.num_images

    @property
    def ssim(self) -> float:
        return sum(s.ssim for s in self.per_image) / self.num_images

    @property
    def lpips(self) -> float | None:
        values = [s.lpips for s in self.per_image if s.lpips is not None]
        return sum(values) / len(values) if values and len(values) == self.num_images else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokenizer": self.tokenizer,
            "source": self.source,
            "image_size": self.image_size,
            "code_shape": list(self.code_shape),
            "num_images": self.num_images,
            "num_resized": self.num_resized,
            "skipped": self.skips.to_dict(),
            "psnr": self.psnr,
            "ssim": self.ssim,
            "lpips": {
                "measured": self.lpips is not None,
                "mean": self.lpips,
                "random_trunk": self.lpips_is_random_trunk,
                "note": self.lpips_note,
            },
            "rfid": {
                "measured": self.rfid is not None,
                "value": self.rfid.fid if self.rfid is not None else None,
                "note": self.rfid_note,
                "scores": self.rfid.to_dict() if self.rfid is not None else None,
            },
            "usage": self.usage.to_dict(),
            "scene_fidelity": self.scene_fidelity.to_dict() if self.scene_fidelity else None,
            "grid": str(self.grid_path) if self.grid_path else None,
            "per_image": [s.to_dict() for s in self.per_image],
        }

    def summary_lines(self) -> list[str]:
        if self.lpips is None:
            lp = f"LPIPS {self.lpips_note}"
        else:
            lp = f"LPIPS {self.lpips:.4f}" + (" (RANDOM trunk: not LPIPS)" if self.lpips_is_random_trunk else "")
        usage = self.usage.to_dict()
        v = usage["num_codes"]
        per_depth = ", ".join(
            f"d{u['depth']} {u['distinct']}/{v} (ppl {u['perplexity']:.1f})" for u in usage["per_depth"]
        )
        lines = [
            f"{self.num_images} images ({self.num_resized} resized to {self.image_size}px); {self.skips.summary()}",
            f"PSNR {self.psnr:.2f} dB, SSIM {self.ssim:.4f}, {lp}",
            f"code usage per depth: {per_depth}",
        ]
        if self.rfid is not None:
            r = self.rfid
            lines.append(f"{r.label}rFID {r.fid:.3f} ({r.num_fake} reconstructions vs originals; {self.rfid_note})")
        else:
            lines.append(f"rFID {self.rfid_note}")
        if self.scene_fidelity is not None:
            f = self.scene_fidelity
            lines.append(
                f"scene fidelity (analyser on reconstructions): shape {f.shape:.3f}, colour {f.colour:.3f}, "
                f"position {f.position:.3f}, size {f.size:.3f}, whole scene {f.overall:.3f} "
                f"(originals {f.originals_overall:.3f})"
            )
        return lines


def eval_visual_tokenizer(
    visual_tokenizer: VisualTokenizer | str | Path,
    images: ImageSet,
    *,
    lpips_trunk: str | None = "auto",
    batch_size: int = 16,
    limit: int | None = None,
    device: str | torch.device = "cpu",
    grid_path: str | Path | None = None,
    grid_count: int = 16,
    rfid: str | FeatureExtractor | None = None,
    inception_weights: str | Path | None = None,
) -> TokenizerEvalResult:
    """Reconstruct every image of `images` (at most `limit`) and score the reconstructions.

    Args:
        visual_tokenizer: a loaded `VisualTokenizer` or its save_pretrained folder.
        lpips_trunk: "auto", a VGG16 file path, "random" (tests only) or None (see the module docstring).
        grid_path: when given, a PNG of original | reconstruction pairs of the first `grid_count` images.
        rfid: "inception" (the FID network; its weights `inception_weights` or the torch hub cache),
            "random-for-tests", a `FeatureExtractor`, or None (not measured). Missing weights are reported
            as "not measured: <reason>", never an error; fewer than 2 images too.

    Returns a `TokenizerEvalResult` (PSNR and SSIM are means of per-image values; code usage counts
    every code position of every image). Raises UserError when no image could be used, ValueError for
    a batch_size, limit or grid_count below 1.
    """
    if batch_size < 1 or (limit is not None and limit < 1) or grid_count < 1:
        raise ValueError(f"batch_size, limit and grid_count must be >= 1 (got {batch_size}, {limit}, {grid_count})")
    source_name = str(visual_tokenizer) if isinstance(visual_tokenizer, (str, Path)) else "<in memory>"
    if isinstance(visual_tokenizer, (str, Path)):
        visual_tokenizer = VisualTokenizer.from_pretrained(str(visual_tokenizer))
    vt = visual_tokenizer.to(device).eval()
    size = vt.config.image_size
    perceptual, lpips_note = load_perceptual(lpips_trunk, device)
    if perceptual is None:
        logger.info("LPIPS %s", lpips_note)
    metrics, rfid_note = _rfid_metrics(rfid, inception_weights, device, batch_size)
    tally = _Tally(CodeUsage(vt.config.num_codes, vt.code_shape[2]), _shapes_config(images, size), grid_count)
    skips = SkipCounts()

    def run(batch: list[NamedImage]) -> None:
        x = torch.stack([pil_to_tensor(item.image) for item in batch]).to(device)  # (b, 3, H, W) in [-1, 1]
        codes, rec = reconstruct_batch(vt, x)
        with torch.no_grad():
            lp = perceptual(x, rec).tolist() if perceptual is not None else [None] * len(batch)
        if metrics is not None:
            metrics.add(x, real=True)  # originals, already at the tokenizer's size
            metrics.add(rec, real=False)
        tally.add(batch, size, codes, x, rec, lp)

    description = f"evaluating tokenizer on {images.kind}"
    run_in_batches(images.iter(size, skips), run, batch_size=batch_size, limit=limit, description=description)
    scores = tally.scores
    if not scores:
        raise UserError(f"no usable images in {images.describe()}; {skips.summary()}")

    source = images.describe()
    if images.kind == "photos":
        source["names"] = [s.name for s in scores]
    written = tally.write_grid(grid_path) if grid_path is not None else None
    rfid_scores, rfid_note = _rfid_scores(metrics, len(scores), rfid_note)
    return TokenizerEvalResult(
        tokenizer=source_name,
        source=source,
        image_size=size,
        code_shape=tuple(vt.code_shape),  # type: ignore[arg-type]
        per_image=scores,
        usage=tally.usage,
        lpips_note=lpips_note,
        lpips_is_random_trunk=perceptual is not None and perceptual.is_random_trunk,
        skips=skips,
        num_resized=tally.num_resized,
        grid_path=written,
        scene_fidelity=tally.scene_fidelity(),
        rfid=rfid_scores,
        rfid_note=rfid_note,
    )


class _Tally:
    """What `eval_visual_tokenizer` collects batch by batch: per-image scores, code usage, the images resized,
    the analyser's scene scores (shapes shards whose every image carries its scene) and the grid's pairs."""

    def __init__(self, usage: CodeUsage, shapes_cfg: ShapesConfig | None, grid_count: int):
        self.usage = usage
        self.shapes_cfg = shapes_cfg
        self.grid_count = grid_count
        self.scores: list[ImageScores] = []
        self.num_resized = 0
        self.scenes: tuple[list[ShapesScore], list[ShapesScore]] = ([], [])  # (reconstructions, originals)
        self.scenes_complete = shapes_cfg is not None
        self.pairs: list[tuple[str, Image.Image]] = []

    def add(self, batch: list[NamedImage], size: int, codes, x, rec, lpips: list[float | None]) -> None:
        """One batch: codes of the images, x (b, 3, H, W) originals and rec their reconstructions in [-1, 1]."""
        self.num_resized += sum(item.original_size != (size, size) for item in batch)
        self.usage.add(codes)
        p, s = psnr(x, rec).tolist(), ssim(x, rec).tolist()
        for i, item in enumerate(batch):
            self.scores.append(ImageScores(item.name, p[i], s[i], lpips[i]))
            if self.scenes_complete and item.scene is None:
                self.scenes_complete = False  # fidelity is reported for whole sets only
            if self.scenes_complete:
                scene = Scene.from_dict(item.scene)
                self.scenes[0].append(score(tensor_to_pil(rec[i].cpu()), scene, self.shapes_cfg))
                self.scenes[1].append(score(item.image, scene, self.shapes_cfg))
            if len(self.pairs) < self.grid_count:
                self.pairs.append((f"{item.name} {p[i]:.1f} dB", side_by_side(item.image, rec[i])))

    def scene_fidelity(self) -> SceneFidelity | None:
        return SceneFidelity.from_scores(*self.scenes) if self.scenes_complete and self.scenes[0] else None

    def write_grid(self, grid_path: str | Path) -> Path:
        """The PNG grid of the first `grid_count` original | reconstruction pairs."""
        written = Path(grid_path)
        written.parent.mkdir(parents=True, exist_ok=True)
        images, captions = [img for _, img in self.pairs], [cap for cap, _ in self.pairs]
        caption_grid(images, captions, columns=4, cell_size=256).save(written)
        return written


def _rfid_metrics(
    rfid: str | FeatureExtractor | None,
    inception_weights: str | Path | None,
    device: str | torch.device,
    batch_size: int,
) -> tuple[DistributionMetrics | None, str]:
    """(metrics to feed, note): the extractor asked for, or None with the reason rFID is not measured."""
    if rfid is None:
        return None, "not measured: not requested"
    if isinstance(rfid, FeatureExtractor):
        extractor, note = rfid, rfid.note
    else:
        extractor, note = try_feature_extractor(rfid, inception_weights, device)
    if extractor is None:
        logger.info("rFID %s", note)
        return None, note
    return DistributionMetrics(extractor, device=device, batch_size=batch_size), note


def _rfid_scores(
    metrics: DistributionMetrics | None, num_images: int, note: str
) -> tuple[DistributionScores | None, str]:
    """(rFID scores, note) once every image was fed: None and the reason when not measured."""
    if metrics is None:
        return None, note
    if num_images < 2:
        return None, f"not measured: FID needs at least 2 images, got {num_images}"
    return metrics.compute(), note


def _shapes_config(images: ImageSet, size: int) -> ShapesConfig | None:
    """The shapes world of a `data shapes` shard folder (None for anything else: no scenes to score)."""
    if images.kind != "shards" or images.path is None:
        return None
    try:
        cfg = shapes_config_from_manifest(images.path)
    except UserError:
        return None  # shards of another generator: PSNR/SSIM/usage only
    return dataclasses.replace(cfg, image_size=size)
