"""`ViewGeneratorConfig`: the JSON-storable choice of a view generator, a registered name plus its options.

The encoder's view_size, view_grid and width follow from the model and are passed to `build`, never stored
(`unicode_mllm/registry.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from unicode_mllm.addons.highres.views import VIEW_GENERATORS, ViewGenerator, build_view_generator
from unicode_mllm.registry import RegisteredChoice, Registry


@dataclass(frozen=True)
class ViewGeneratorConfig(RegisteredChoice):
    """How a high-resolution image becomes encoder views: name ('single', 's2', 'inf_llava') and its options."""

    name: str = "single"

    registry: ClassVar[Registry] = VIEW_GENERATORS
    default_source: ClassVar[str] = "view_generator"

    def build(self, *, view_size: tuple[int, int], view_grid: tuple[int, int], width: int) -> ViewGenerator:
        self.validate()
        return build_view_generator(self.name, view_size=view_size, view_grid=view_grid, width=width, **self.options)
