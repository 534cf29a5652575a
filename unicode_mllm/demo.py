"""The README's main job: the whole pipeline on the embedded tiny preset, ending in `report/`.

Stages run in order and each adds its figures to the report. Implemented so far: the shapes data set
(shards + sample grid) and the analyser check that later scores text-to-image output. Stage 0 (the
tiny LM), stage 1 (the visual tokenizer) and stage 2 (the MLLM) join this pipeline as they land.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unicode_mllm.data.shapes import ShapesConfig
from unicode_mllm.data.shapes_dataset import analyser_accuracy, write_shapes_dataset
from unicode_mllm.report import Section, write_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoProfile:
    image_size: int
    train: int
    val: int
    heldout: int
    analyser_count: int


PROFILES = {
    "full": DemoProfile(image_size=64, train=2000, val=200, heldout=200, analyser_count=1000),
    "quick": DemoProfile(image_size=64, train=200, val=50, heldout=50, analyser_count=100),
}


def run_demo(out_dir: str | Path, quick: bool = False) -> dict[str, Any]:
    """Run every implemented stage into `out_dir`; returns the metrics also written to report/metrics.json."""
    out_dir = Path(out_dir)
    profile = PROFILES["quick" if quick else "full"]
    metrics: dict[str, Any] = {"profile": "quick" if quick else "full", "stages": {}}
    sections: list[Section] = []
    started = time.perf_counter()

    data_dir = out_dir / "data" / "shapes"
    shapes_cfg = ShapesConfig(image_size=profile.image_size)
    counts = {"train": profile.train, "val": profile.val, "heldout": profile.heldout}
    result = write_shapes_dataset(shapes_cfg, data_dir, counts, overwrite=True)
    log.info("data: %s", result.summary())
    metrics["stages"]["data"] = {split: s.num_samples for split, s in result.summaries.items()}
    sections.append(
        Section(
            "Shapes data",
            f"{result.summary()}; held-out colour+shape pairs: {', '.join(shapes_cfg.held_out_pairs)}.",
            images=[(result.grid_path, "training samples with their captions")],
        )
    )

    rows = analyser_accuracy(profile.analyser_count, profile.image_size, seed=shapes_cfg.seed + 1)
    metrics["stages"]["analyser"] = {r.condition: r.accuracy for r in rows}
    sections.append(
        Section(
            "Analyser check (scores text-to-image output later)",
            "Exact-scene recovery on freshly rendered validation images.",
            table=[["condition", "images", "exact", "accuracy"]]
            + [[r.condition, r.count, r.exact, f"{100 * r.accuracy:.2f}%"] for r in rows],
        )
    )
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    page = write_report(out_dir / "report", "unicode-mllm demo", sections, metrics)
    log.info("report: %s", page)
    return metrics
