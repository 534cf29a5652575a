"""`Scene` and `SceneObject`: what is in one shapes-world image, independent of its pixels."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from unicode_mllm.data.shapes.config import POSITIONS
from unicode_mllm.errors import UserError


@dataclass(frozen=True)
class SceneObject:
    """One coloured shape in a grid cell.

    `size` and `position` may be None only in targets parsed from free text ("draw a red circle"),
    where they mean "any"; the world always fills them in. `offset` is the shift of the shape's centre
    from its cell centre as (dx, dy) in units of the cell side; it places the pixels but is not part
    of what the scene says, so it takes no part in equality.
    """

    shape: str
    colour: str
    size: str | None
    position: str | None
    offset: tuple[float, float] = field(default=(0.0, 0.0), compare=False)

    @property
    def pair(self) -> tuple[str, str]:
        """(colour, shape), the unit that held-out splits are made of."""
        return (self.colour, self.shape)

    @property
    def cell(self) -> int:
        """Index of the grid cell in reading order (0 = top left, 8 = bottom right)."""
        if self.position is None:
            raise ValueError(f"{self.colour} {self.shape} has no position, so it has no grid cell")
        return POSITIONS.index(self.position)

    def to_dict(self) -> dict[str, Any]:
        """The fields in declaration order; the offset as a list rounded to 4 places (what the shards hold)."""
        return {**asdict(self), "offset": [round(float(v), 4) for v in self.offset]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneObject:
        missing = [k for k in ("shape", "colour") if k not in data]
        if missing:
            raise UserError(f"scene object {data!r} lacks {missing}; give at least 'shape' and 'colour'")
        offset = data.get("offset", (0.0, 0.0))
        return cls(
            shape=data["shape"],
            colour=data["colour"],
            size=data.get("size"),
            position=data.get("position"),
            offset=(float(offset[0]), float(offset[1])),
        )


@dataclass(frozen=True)
class Scene:
    """The objects of one image (reading order of their cells) and its background colour.

    `background` is None only in parsed targets that name no background.
    """

    objects: tuple[SceneObject, ...]
    background: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects], "background": self.background}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        if "objects" not in data:
            raise UserError(f"scene {data!r} has no 'objects' list; give one (it may be empty)")
        return cls(
            objects=tuple(SceneObject.from_dict(o) for o in data["objects"]),
            background=data.get("background"),
        )
