"""The files a training run writes into its out_dir, shared by the stage-1 and stage-2 trainers.

    out_dir/config.yaml           the resolved config, written when the run starts (and again on resume)
    out_dir/metrics.jsonl         one JSON object per line: training logs and evaluations, by step
    out_dir/curves.png            panels of metrics.jsonl (`plot`)
    out_dir/final_metrics.json    the run's last numbers
    out_dir/final/                the `save_pretrained` folder, swapped in whole (never half-written);
                                  it also holds train_config.yaml

Only the main process writes; the others call the same methods and return (`save_final` waits for
every process first, so the weights it saves are the ones all ranks agree on).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unicode_mllm.config import dump_config
from unicode_mllm.runtime.checkpoint import atomic_write_text
from unicode_mllm.viz import plot_curves, read_jsonl

if TYPE_CHECKING:
    from accelerate import Accelerator

CONFIG_FILENAME = "config.yaml"
METRICS_FILENAME = "metrics.jsonl"
CURVES_FILENAME = "curves.png"
FINAL_METRICS_FILENAME = "final_metrics.json"
FINAL_DIRNAME = "final"
FINAL_CONFIG_FILENAME = "train_config.yaml"


class RunFiles:
    """Writes the run's config, metric log, curves, final metrics and final model folder (main process only)."""

    def __init__(self, out_dir: str | Path, accelerator: Accelerator, cfg: Any):
        self.out_dir = Path(out_dir)
        self.accelerator = accelerator
        self.cfg = cfg  # a dataclass config, saved with `dump_config`

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_FILENAME

    def write_config(self) -> None:
        """Create out_dir and write config.yaml."""
        if self.accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / CONFIG_FILENAME, dump_config(self.cfg))

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one JSON row to metrics.jsonl."""
        if not self.accelerator.is_main_process:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, panels: dict[str, Sequence[str]], log_scale: Sequence[str] = ()) -> Path | None:
        """curves.png from metrics.jsonl (`viz.plot_curves` panels: title -> metric keys); None before any log."""
        if not self.metrics_path.is_file():
            return None
        return plot_curves(read_jsonl(self.metrics_path), panels, self.out_dir / CURVES_FILENAME, log_scale=log_scale)

    def write_final_metrics(self, metrics: Mapping[str, Any]) -> None:
        """final_metrics.json (indented JSON, keys in the given order)."""
        if self.accelerator.is_main_process:
            atomic_write_text(self.out_dir / FINAL_METRICS_FILENAME, json.dumps(metrics, indent=2) + "\n")

    def save_final(self, save: Callable[[Path], None]) -> Path:
        """`save(tmp)` writes the model into out_dir/.final.tmp, which then replaces out_dir/final; returns final.

        train_config.yaml is added to the folder before the swap, so the model and its config arrive together.
        """
        final = self.out_dir / FINAL_DIRNAME
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            tmp = self.out_dir / f".{FINAL_DIRNAME}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save(tmp)
            atomic_write_text(tmp / FINAL_CONFIG_FILENAME, dump_config(self.cfg))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        return final
