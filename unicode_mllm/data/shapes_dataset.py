"""Write the shapes world to webdataset shards (+ manifest + sample grid) and measure its analyser."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unicode_mllm.config import config_to_dict
from unicode_mllm.data.shapes import ShapesConfig, ShapesWorld, add_gaussian_noise, analyse, jpeg_roundtrip
from unicode_mllm.data.shards import SplitSummary, write_manifest, write_split
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.progress import track
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


@dataclass
class AnalyserAccuracy:
    condition: str
    image_size: int
    count: int
    exact: int  # images whose whole scene (every object's shape, colour, size, position; count) came back

    @property
    def accuracy(self) -> float:
        return self.exact / self.count

    def line(self) -> str:
        return (
            f"{self.image_size:>4} px  {self.condition:<18} {self.exact:>5}/{self.count}  {100 * self.accuracy:6.2f}%"
        )


def _scene_key(scene: Any) -> tuple:
    objects = sorted((o.position, o.shape, o.colour, o.size) for o in scene.objects)
    return (tuple(objects), scene.background)


def analyser_accuracy(
    count: int = 1000, image_size: int = 64, seed: int = 12345, conditions: tuple[str, ...] = ("clean", "noise", "jpeg")
) -> list[AnalyserAccuracy]:
    """Render `count` fresh val images and read them back, clean, with Gaussian noise (sigma 5/255)
    and after JPEG at quality 75. Exact-scene accuracy per condition."""
    world = ShapesWorld(ShapesConfig(image_size=image_size, seed=seed))
    perturb = {
        "clean": lambda img, i: img,
        "noise": lambda img, i: add_gaussian_noise(img, sigma=5.0, seed=i),
        "jpeg": lambda img, i: jpeg_roundtrip(img, quality=75),
    }
    results = []
    for condition in conditions:
        if condition not in perturb:
            raise UserError(f"condition {condition!r} is unknown; choose from {sorted(perturb)}")
        exact = 0
        for sample in track(world.iter_split("val", count), f"analyser {condition} {image_size}px", total=count):
            found = analyse(perturb[condition](sample.image, sample.index))
            exact += _scene_key(found) == _scene_key(sample.scene)
        results.append(AnalyserAccuracy(condition, image_size, count, exact))
    return results


def measure_analyser(count: int = 1000, image_size: int = 64, seed: int = 12345) -> list[str]:
    """Printable lines for `unicode-mllm data check-analyser`."""
    rows = analyser_accuracy(count, image_size, seed)
    return ["size  condition          exact/count  accuracy", *(r.line() for r in rows)]
