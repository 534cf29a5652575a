"""Write the shapes world to webdataset shards (+ manifest + sample grid) and measure its analyser."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unicode_mllm.config import config_to_dict
from unicode_mllm.data.shapes import ShapesConfig, ShapesWorld, add_gaussian_noise, jpeg_roundtrip, score
from unicode_mllm.data.shards import write_manifest, write_split
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.progress import track
from unicode_mllm.shard_manifest import SplitSummary
from unicode_mllm.viz import caption_grid

GRID_NAME = "samples.png"


@dataclass
class ShapesDatasetResult:
    out_dir: Path
    summaries: dict[str, SplitSummary]
    grid_path: Path

    def summary(self) -> str:
        parts = [f"{s.num_samples} {name} in {len(s.shards)} shard(s)" for name, s in self.summaries.items()]
        return ", ".join(parts)


def _records(world: ShapesWorld, split: str, count: int) -> Iterator[dict[str, Any]]:
    for sample in world.iter_split(split, count):
        yield {"key": sample.id, "image": sample.image, "meta": sample.to_json()}


def write_shapes_dataset(
    cfg: ShapesConfig,
    out_dir: str | Path,
    counts: Mapping[str, int],
    *,
    shard_size: int = 1000,
    overwrite: bool = False,
    grid_samples: int = 16,
) -> ShapesDatasetResult:
    """Render `counts[split]` samples per split into `out_dir/{split}-NNNNNN.tar` plus `manifest.json`
    and a captioned grid PNG of the first training samples.

    Raises UserError when a split is unknown or the folder already holds shards (without overwrite).
    """
    out_dir = Path(out_dir)
    world = ShapesWorld(cfg)
    summaries = {}
    for split, count in counts.items():
        if count == 0:
            continue
        summaries[split] = write_split(
            _records(world, split, count), out_dir, split, maxcount=shard_size, overwrite=overwrite, total=count
        )
    if not summaries:
        raise UserError("nothing to write: every split count is 0; pass e.g. --train 2000 --val 200")
    write_manifest(out_dir, summaries.values(), {"generator": "shapes", "shapes": config_to_dict(world.cfg)})
    first_split = next(iter(summaries))
    shown = list(world.iter_split(first_split, min(grid_samples, counts[first_split])))
    grid = caption_grid([s.image for s in shown], [s.caption for s in shown], columns=4, cell_size=160)
    grid_path = out_dir / GRID_NAME
    grid.save(grid_path)
    return ShapesDatasetResult(out_dir=out_dir, summaries=summaries, grid_path=grid_path)


ATTRIBUTES = ("shape", "colour", "position", "size", "count", "background")


@dataclass
class AnalyserAccuracy:
    """How well the analyser reads `count` fresh renders back under one condition.

    exact: images whose whole scene came back (every object's shape, colour, size and position, the
    object count and the background). attributes: mean per-attribute score (see `shapes.score`).
    """

    condition: str
    image_size: int
    count: int
    exact: int
    attributes: dict[str, float]

    @property
    def accuracy(self) -> float:
        return self.exact / self.count

    def line(self) -> str:
        cols = " ".join(f"{100 * self.attributes[a]:>7.1f}" for a in ATTRIBUTES)
        head = f"{self.image_size:>4} {self.condition:<9} {self.exact:>5}/{self.count:<5}"
        return f"{head} {100 * self.accuracy:>7.2f} {cols}"


HEADER = f"{'size':>4} {'condition':<9} {'exact':>11} {'exact%':>7} " + " ".join(f"{a[:7]:>7}" for a in ATTRIBUTES)


def analyser_accuracy(
    count: int = 1000,
    image_size: int = 64,
    seed: int = 12345,
    conditions: tuple[str, ...] = ("clean", "noise", "jpeg"),
    noise_sigma: float = 5.0,
    jpeg_quality: int = 75,
) -> list[AnalyserAccuracy]:
    """Render `count` fresh val images and score the analyser's reading of them against their scenes:
    clean, with Gaussian noise (`noise_sigma` in 0-255 units) and after JPEG at `jpeg_quality`."""
    world = ShapesWorld(ShapesConfig(image_size=image_size, seed=seed))
    perturb = {
        "clean": lambda img, i: img,
        "noise": lambda img, i: add_gaussian_noise(img, sigma=noise_sigma, seed=i),
        "jpeg": lambda img, i: jpeg_roundtrip(img, quality=jpeg_quality),
    }
    unknown = [c for c in conditions if c not in perturb]
    if unknown:
        raise UserError(f"conditions {unknown} are unknown; choose from {sorted(perturb)}")
    samples = list(world.iter_split("val", count))
    results = []
    for condition in conditions:
        exact, totals = 0, dict.fromkeys(ATTRIBUTES, 0.0)
        for sample in track(samples, f"analyser {condition} {image_size}px"):
            result = score(perturb[condition](sample.image, sample.index), sample.scene, world.cfg)
            exact += result.exact
            for a in ATTRIBUTES:
                totals[a] += float(getattr(result, a))
        results.append(AnalyserAccuracy(condition, image_size, count, exact, {a: v / count for a, v in totals.items()}))
    return results


def measure_analyser(count: int = 1000, image_size: int = 64, seed: int = 12345) -> list[str]:
    """Printable lines for `unicode-mllm data check-analyser`."""
    return [HEADER, *(r.line() for r in analyser_accuracy(count, image_size, seed))]
