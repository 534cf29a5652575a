"""Text-to-image accuracy on the shapes world, GenEval-style, for seen and held-out colour+shape pairs.

The model is reached only through `generate_fn(prompts) -> images` (one RGB PIL image per prompt, any
size), so this module does not depend on how the model samples; the CLI passes
`UniCodeMLLM.generate_images`. Prompts are the world's drawing instructions:
- `seen`: instructions of the `val` split (every colour+shape pair was in training);
- `heldout`: instructions of the `heldout` split (each names at least one held-out pair, e.g. "red
  triangle", that no training image showed).
Each generated image is read back by the shapes analyser and scored against
`parse_instruction(prompt)` with `data.shapes.score`: per prompt, the fraction of the named objects
whose shape / colour / position / size is right (after a one-to-one matching of found to named
objects), whether the object count and the background are right, `overall` (every object right in
shape, colour and position, and the count right) and `exact` (also every size and the background).
A group reports the means of these over its prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from unicode_mllm.config import config_to_dict
from unicode_mllm.data.shapes import ShapesConfig, ShapesScore, ShapesWorld, parse_instruction, score
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.progress import track
from unicode_mllm.viz import caption_grid

GenerateFn = Callable[[list[str]], list[Image.Image]]
# Prompt group -> the world split whose instructions it uses.
T2I_GROUPS: dict[str, str] = {"seen": "val", "heldout": "heldout"}
FRACTIONS = ("shape", "colour", "position", "size")
RATES = ("count", "background", "overall", "exact")


@dataclass(frozen=True)
class T2IPrompt:
    prompt: str
    group: str  # "seen" or "heldout"
    source: str  # the world sample it came from, e.g. "heldout-000003"


def shapes_t2i_prompts(cfg: ShapesConfig | None = None, count: int = 50, *, start: int = 0) -> list[T2IPrompt]:
    """`count` instructions per group: samples start..start+count-1 of the `val` and `heldout` splits of the world.

    Use the configuration the model's training data was written with (e.g. from its shard manifest), so
    that the held-out pairs are the ones training never saw. Raises ValueError when count < 1.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    world = ShapesWorld(cfg)
    return [
        T2IPrompt(sample.instruction, group, sample.id)
        for group, split in T2I_GROUPS.items()
        for sample in world.iter_split(split, count, start)
    ]


def shapes_config_from_manifest(data_dir: str | Path) -> ShapesConfig:
    """The `ShapesConfig` a shapes shard folder was written with (its manifest's generator_config).

    A folder written by `unicode-mllm tokenize` from a shapes folder works too: its manifest keeps the
    source's generator_config as `source_generator` (followed through repeated tokenizing).
    """
    from unicode_mllm.config import config_from_dict
    from unicode_mllm.data.shards import read_manifest

    config = read_manifest(data_dir).source_generator_config()
    raw = config.get("shapes") if isinstance(config, dict) else None
    if not isinstance(config, dict) or config.get("generator") != "shapes" or not isinstance(raw, dict):
        raise UserError(
            f"{data_dir} was not written by `unicode-mllm data shapes` (nor tokenized from such a folder); "
            "pass a shapes shard folder"
        )
    return config_from_dict(ShapesConfig, raw, source=f"{data_dir}/manifest.json")


@dataclass
class T2IResult:
    """Per-prompt scores; `to_dict()` is the JSON report (groups, all prompts, per prompt)."""

    prompts: list[T2IPrompt]
    scores: list[ShapesScore]
    shapes_config: dict[str, Any]
    grid_path: Path | None = None
    groups: list[str] = field(default_factory=list)

    def group_summary(self, group: str | None) -> dict[str, Any]:
        """Means over the prompts of `group` (None: all prompts)."""
        picked = [s for p, s in zip(self.prompts, self.scores, strict=True) if group is None or p.group == group]
        n = len(picked)
        out: dict[str, Any] = {"num_prompts": n}
        for name in FRACTIONS + RATES:
            out[name] = sum(float(getattr(s, name)) for s in picked) / n if n else None
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "shapes_config": self.shapes_config,
            "groups": {g: self.group_summary(g) for g in self.groups},
            "all": self.group_summary(None),
            "grid": str(self.grid_path) if self.grid_path else None,
            "per_prompt": [
                {"prompt": p.prompt, "group": p.group, "source": p.source, **s.to_dict()}
                for p, s in zip(self.prompts, self.scores, strict=True)
            ],
        }

    def summary_lines(self) -> list[str]:
        lines = []
        for group in [*self.groups, None]:
            g = self.group_summary(group)
            cols = ", ".join(f"{name} {100 * g[name]:.1f}%" for name in ("overall", *FRACTIONS, "count", "exact"))
            lines.append(f"{group or 'all'} ({g['num_prompts']} prompts): {cols}")
        return lines


def eval_t2i(
    generate_fn: GenerateFn,
    prompts: Sequence[T2IPrompt],
    *,
    cfg: ShapesConfig | None = None,
    batch_size: int = 8,
    grid_path: str | Path | None = None,
    grid_count: int = 16,
) -> T2IResult:
    """Generate one image per prompt (in batches of `batch_size`) and score it with the shapes analyser.

    `cfg` is the world's configuration (its shapes, colours and backgrounds are what the analyser looks
    for); use the one the prompts came from. `grid_path`: a PNG of the first `grid_count` generations
    captioned with their prompt. Raises ValueError when generate_fn does not return one PIL image per
    prompt or batch_size < 1, UserError when a prompt is not an instruction the parser can read.
    """
    if batch_size < 1 or grid_count < 1:
        raise ValueError(f"batch_size and grid_count must be >= 1 (got {batch_size}, {grid_count})")
    if not prompts:
        raise UserError("no prompts to evaluate; give at least one")
    cfg = ShapesWorld(cfg).cfg  # validated
    targets = [parse_instruction(p.prompt) for p in prompts]  # fail before generating anything
    scores: list[ShapesScore] = []
    shown: list[tuple[Image.Image, str]] = []
    starts = range(0, len(prompts), batch_size)
    for start in track(starts, "generating and scoring images", total=len(starts)):
        batch = list(prompts[start : start + batch_size])
        images = generate_fn([p.prompt for p in batch])
        if not isinstance(images, list) or len(images) != len(batch):
            got = len(images) if isinstance(images, list) else type(images).__name__
            raise ValueError(f"generate_fn must return a list of {len(batch)} images (one per prompt), got {got}")
        for i, (prompt, image) in enumerate(zip(batch, images, strict=True)):
            if not isinstance(image, Image.Image):
                raise ValueError(f"generate_fn returned a {type(image).__name__} for {prompt.prompt!r}; want PIL")
            result = score(image.convert("RGB"), targets[start + i], cfg)
            scores.append(result)
            if len(shown) < grid_count:
                shown.append((image, f"[{prompt.group}] {'ok' if result.overall else 'wrong'}: {prompt.prompt}"))
    written = None
    if grid_path is not None:
        written = Path(grid_path)
        written.parent.mkdir(parents=True, exist_ok=True)
        caption_grid([img for img, _ in shown], [cap for _, cap in shown], columns=4, cell_size=160).save(written)
    groups = list(dict.fromkeys(p.group for p in prompts))
    return T2IResult(list(prompts), scores, config_to_dict(cfg), written, groups)
