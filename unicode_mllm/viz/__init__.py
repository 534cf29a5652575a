"""Pictures for people: caption grids of samples and generations."""

from unicode_mllm.viz.grid import caption_grid

__all__ = ["caption_grid"]
