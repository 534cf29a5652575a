"""Text-to-image evaluation: the shapes analyser's accuracy on the built-in world, and FID/KID/IS on captions.

The model is reached only through `generate_fn(prompts) -> images` (one RGB PIL image per prompt, any
size), so this module does not depend on how the model samples; the CLI passes
`generation.generate_images`' images.

Shapes world (`eval_t2i`), GenEval-style, for seen and held-out colour+shape pairs. Prompts are the world's
drawing instructions:
- `seen`: instructions of the `val` split (every colour+shape pair was in training);
- `heldout`: instructions of the `heldout` split (each names at least one held-out pair, e.g. "red
  triangle", that no training image showed).
Each generated image is read back by the shapes analyser and scored against
`parse_instruction(prompt)` with `data.shapes.score`: per prompt, the fraction of the named objects
whose shape / colour / position / size is right (after a one-to-one matching of found to named
objects), whether the object count and the background are right, `overall` (every object right in
shape, colour and position, and the count right) and `exact` (also every size and the background).
A group reports the means of these over its prompts. Given a `DistributionMetrics`, FID/KID/IS of the
generations against the world's own images of the same instructions are reported beside it.

Captions (`eval_t2i_captions`): one image per caption of the first `count` pairs of a `CaptionSet` (COCO
captions, a `data from-coco` folder, an img2dataset folder), and FID/KID/IS (`evaluation.fid`) of the
generations against those real images, centre-cropped to the generator's resolution.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from unicode_mllm.config import config_to_dict
from unicode_mllm.data.image_policy import center_crop
from unicode_mllm.data.shapes import ShapesConfig, ShapesScore, ShapesWorld, parse_instruction, score
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation.caption_sets import CaptionedImage, CaptionSet
from unicode_mllm.evaluation.fid import DistributionMetrics, DistributionScores
from unicode_mllm.evaluation.item_batches import run_in_batches
from unicode_mllm.evaluation.skips import SkipCounts
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
    from unicode_mllm.shard_manifest import read_manifest

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
    distribution: DistributionScores | None = None  # FID/KID/IS against the world's images, when measured
    distribution_note: str | None = None  # None: not requested (the report then has no "fid" key)

    def group_summary(self, group: str | None) -> dict[str, Any]:
        """Means over the prompts of `group` (None: all prompts)."""
        picked = [s for p, s in zip(self.prompts, self.scores, strict=True) if group is None or p.group == group]
        n = len(picked)
        out: dict[str, Any] = {"num_prompts": n}
        for name in FRACTIONS + RATES:
            out[name] = sum(float(getattr(s, name)) for s in picked) / n if n else None
        return out

    def to_dict(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "shapes_config": self.shapes_config,
            "groups": {g: self.group_summary(g) for g in self.groups},
            "all": self.group_summary(None),
            "grid": str(self.grid_path) if self.grid_path else None,
        }
        if self.distribution_note is not None:
            scores = self.distribution.to_dict() if self.distribution else None
            report["fid"] = {"measured": scores is not None, "note": self.distribution_note, "scores": scores}
        report["per_prompt"] = [
            {"prompt": p.prompt, "group": p.group, "source": p.source, **s.to_dict()}
            for p, s in zip(self.prompts, self.scores, strict=True)
        ]
        return report

    def summary_lines(self) -> list[str]:
        lines = []
        for group in [*self.groups, None]:
            g = self.group_summary(group)
            cols = ", ".join(f"{name} {100 * g[name]:.1f}%" for name in ("overall", *FRACTIONS, "count", "exact"))
            lines.append(f"{group or 'all'} ({g['num_prompts']} prompts): {cols}")
        if self.distribution is not None:
            lines.append(f"against the world's images: {self.distribution.summary_line()}")
        elif self.distribution_note is not None:
            lines.append(f"FID {self.distribution_note}")
        return lines

    def markdown_rows(self) -> list[tuple[str, str]]:
        rows = []
        for group in [*self.groups, None]:
            g = self.group_summary(group)
            rows.append((f"{group or 'all'} overall ({g['num_prompts']} prompts)", f"{100 * g['overall']:.1f}%"))
        if self.distribution is not None:
            rows += self.distribution.markdown_rows()
        elif self.distribution_note is not None:
            rows.append(("FID", self.distribution_note))
        return rows


def _world_image(world: ShapesWorld, prompt: T2IPrompt) -> Image.Image:
    """The world's image of the sample a prompt came from (`source` "<split>-<index>", as `shapes_t2i_prompts`)."""
    split, _, index = prompt.source.rpartition("-")
    if not split or not index.isdigit():
        raise ValueError(f"prompt source {prompt.source!r} is not a world sample id; use shapes_t2i_prompts")
    return world.sample(split, int(index)).image


def _check_images(images: Any, prompts: list[str]) -> list[Image.Image]:
    """`images` if it is one PIL image per prompt; ValueError naming what generate_fn returned otherwise."""
    if not isinstance(images, list) or len(images) != len(prompts):
        got = len(images) if isinstance(images, list) else type(images).__name__
        raise ValueError(f"generate_fn must return a list of {len(prompts)} images (one per prompt), got {got}")
    for prompt, image in zip(prompts, images, strict=True):
        if not isinstance(image, Image.Image):
            raise ValueError(f"generate_fn returned a {type(image).__name__} for {prompt!r}; want PIL")
    return images


def _save_grid(shown: list[tuple[Image.Image, str]], grid_path: str | Path | None) -> Path | None:
    if grid_path is None:
        return None
    written = Path(grid_path)
    written.parent.mkdir(parents=True, exist_ok=True)
    caption_grid([img for img, _ in shown], [cap for _, cap in shown], columns=4, cell_size=160).save(written)
    return written


def eval_t2i(
    generate_fn: GenerateFn,
    prompts: Sequence[T2IPrompt],
    *,
    cfg: ShapesConfig | None = None,
    batch_size: int = 8,
    grid_path: str | Path | None = None,
    grid_count: int = 16,
    metrics: DistributionMetrics | None = None,
    metrics_note: str | None = None,
) -> T2IResult:
    """Generate one image per prompt (in batches of `batch_size`) and score it with the shapes analyser.

    `cfg` is the world's configuration (its shapes, colours and backgrounds are what the analyser looks
    for); use the one the prompts came from. `grid_path`: a PNG of the first `grid_count` generations
    captioned with their prompt. `metrics`: also collect the generations and the world's images of the
    same prompts (centre-cropped to the generated size) and report FID/KID/IS; `metrics_note` says why
    they were not measured (e.g. no Inception weights) and is reported instead. Raises ValueError when
    generate_fn does not return one PIL image per prompt or batch_size < 1, UserError when a prompt is
    not an instruction the parser can read.
    """
    if batch_size < 1 or grid_count < 1:
        raise ValueError(f"batch_size and grid_count must be >= 1 (got {batch_size}, {grid_count})")
    if not prompts:
        raise UserError("no prompts to evaluate; give at least one")
    world = ShapesWorld(cfg)
    cfg = world.cfg  # validated
    targets = [parse_instruction(p.prompt) for p in prompts]  # fail before generating anything
    scores: list[ShapesScore] = []
    shown: list[tuple[Image.Image, str]] = []
    starts = range(0, len(prompts), batch_size)
    for start in track(starts, "generating and scoring images", total=len(starts)):
        batch = list(prompts[start : start + batch_size])
        images = _check_images(generate_fn([p.prompt for p in batch]), [p.prompt for p in batch])
        for i, (prompt, image) in enumerate(zip(batch, images, strict=True)):
            result = score(image.convert("RGB"), targets[start + i], cfg)
            scores.append(result)
            if len(shown) < grid_count:
                shown.append((image, f"[{prompt.group}] {'ok' if result.overall else 'wrong'}: {prompt.prompt}"))
        if metrics is not None:
            metrics.add(images, real=False)
            size = (images[0].height, images[0].width)
            metrics.add([center_crop(_world_image(world, p), size) for p in batch], real=True)
    written = _save_grid(shown, grid_path)
    groups = list(dict.fromkeys(p.group for p in prompts))
    distribution = metrics.compute() if metrics is not None else None
    note = metrics.extractor.name if metrics is not None else metrics_note
    return T2IResult(list(prompts), scores, config_to_dict(cfg), written, groups, distribution, note)


# ----------------------------------------------------------------------------------------- captions


@dataclass
class CaptionT2IResult:
    """FID/KID/IS of one image per caption against the captions' real images; `to_dict()` is the JSON report."""

    source: dict[str, Any]  # CaptionSet.describe()
    requested: int  # how many pairs were asked for (fewer are used when the set is smaller)
    image_size: int
    items: list[tuple[str, str]]  # (real image name, caption), in generation order
    scores: DistributionScores
    skips: SkipCounts
    grid_path: Path | None = None

    @property
    def num_images(self) -> int:
        return len(self.items)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "requested": self.requested,
            "num_images": self.num_images,
            "skipped": self.skips.to_dict(),
            **self.scores.to_dict(),  # fid, kid, inception_score, image_size [h, w], features, notes
            "grid": str(self.grid_path) if self.grid_path else None,
            "per_image": [{"real": name, "caption": caption} for name, caption in self.items],
        }

    def summary_lines(self) -> list[str]:
        lines = [
            f"{self.num_images} captions (asked for {self.requested}), real images centre-cropped to "
            f"{self.image_size}px; {self.skips.summary()}",
            self.scores.summary_line(),
        ]
        return lines + [f"note: {note}" for note in self.scores.notes]

    def markdown_rows(self) -> list[tuple[str, str]]:
        return self.scores.markdown_rows()


def eval_t2i_captions(
    generate_fn: GenerateFn,
    captions: CaptionSet,
    metrics: DistributionMetrics,
    *,
    count: int,
    image_size: int,
    batch_size: int = 8,
    grid_path: str | Path | None = None,
    grid_count: int = 16,
) -> CaptionT2IResult:
    """Generate one image for each of the first `count` captions of `captions` and measure FID/KID/IS.

    Real images are centre-cropped to `image_size` (the generator's resolution) and fed to `metrics` batch by
    batch beside the generations, so only features are kept, never the images. `grid_path`: a PNG of the first
    `grid_count` generations captioned with their caption. Raises ValueError when generate_fn does not return
    one PIL image per caption or a count/size below 1, UserError when fewer than 2 pairs could be used.
    """
    if min(count, batch_size, grid_count, image_size) < 1:
        got = f"{count}, {batch_size}, {grid_count}, {image_size}"
        raise ValueError(f"count, batch_size, grid_count and image_size must be >= 1 (got {got})")
    skips = SkipCounts()
    items: list[tuple[str, str]] = []
    shown: list[tuple[Image.Image, str]] = []

    def run(batch: list[CaptionedImage]) -> None:
        texts = [item.caption for item in batch]
        images = _check_images(generate_fn(texts), texts)
        metrics.add([item.image for item in batch], real=True)
        metrics.add(images, real=False)
        items.extend((item.name, item.caption) for item in batch)
        shown.extend(list(zip(images, texts, strict=True))[: max(0, grid_count - len(shown))])

    description = f"generating images for {captions.name}"
    run_in_batches(captions.iter(image_size, skips), run, batch_size=batch_size, limit=count, description=description)
    if len(items) < 2:
        raise UserError(f"only {len(items)} usable caption/image pairs in {captions.path}; {skips.summary()}")
    written = _save_grid(shown, grid_path)
    return CaptionT2IResult(captions.describe(), count, image_size, items, metrics.compute(), skips, written)


# ----------------------------------------------------------------------------------------- results files


def results_markdown(title: str, rows: list[tuple[str, str]], settings: dict[str, Any]) -> str:
    """A markdown page: the results table, then the exact settings (sampling, images, data, features)."""

    def cell(value: Any) -> str:
        text = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
        return text.replace("|", "\\|")

    lines = [f"# {title}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {cell(name)} | {cell(value)} |" for name, value in rows]
    lines += ["", "| setting | value |", "| --- | --- |"]
    lines += [f"| {cell(name)} | {cell(value)} |" for name, value in settings.items()]
    return "\n".join(lines) + "\n"


def write_results(report: dict[str, Any], markdown: str, json_path: Path) -> tuple[Path, Path]:
    """Write the JSON report to `json_path` and the markdown table beside it (same name, `.md`)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown)
    return json_path, md_path
