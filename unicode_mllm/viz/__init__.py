"""Pictures for people: caption grids of samples and generations, training curves."""

from unicode_mllm.viz.curves import plot_curves, read_jsonl
from unicode_mllm.viz.grid import caption_grid

__all__ = ["caption_grid", "plot_curves", "read_jsonl"]
