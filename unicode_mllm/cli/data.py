"""`unicode-mllm data ...`: build and inspect data sets (webdataset shards)."""

from __future__ import annotations

from pathlib import Path

import typer

from unicode_mllm.cli.checks import check_at_least, check_split_name, ensure_writable_output
from unicode_mllm.errors import UserError

data_app = typer.Typer(help="Build and inspect data sets (webdataset shards).", no_args_is_help=True)

SET_HELP = "Override a config value, e.g. --set image_size=32 (repeatable)."
# Every converter writes one split of shards.
SHARDS_OUT_OPTION = typer.Option(..., "--out", help="Output folder for shards and manifest.")
SPLIT_OPTION = typer.Option("train", "--split", help="Split name to write.")
SHARD_SIZE_OPTION = typer.Option(1000, "--shard-size", help="Samples per tar shard.")
OVERWRITE_SPLIT_OPTION = typer.Option(False, "--overwrite", help="Replace existing shards of this split.")


def _check_shard_output(split: str, shard_size: int, out: Path) -> None:
    """The checks every converter makes of where it writes, before reading any input."""
    check_split_name(split)
    check_at_least(shard_size, 1, "--shard-size")
    ensure_writable_output(out, "--out", folder=True)


def _check_inputs(files: dict[str, Path | None], images: Path) -> None:
    """Up-front checks of a converter's input files (option -> path; None is not given) and its --images folder."""
    for option, path in files.items():
        if path is not None and not path.is_file():
            raise UserError(f"{option} {path} not found; pass an existing JSON file")
    if not images.is_dir():
        raise UserError(f"--images {images} not found; pass the folder that holds the COCO images")


@data_app.command("shapes")
def data_shapes(
    out: Path = typer.Option(..., "--out", help="Output folder for shards, manifest and sample grid."),
    train: int = typer.Option(2000, "--train", help="Number of training samples."),
    val: int = typer.Option(200, "--val", help="Number of validation samples (seen combinations)."),
    heldout: int | None = typer.Option(
        None, "--heldout", help="Number of held-out-combination samples (default: same as --val)."
    ),
    size: int | None = typer.Option(None, "--size", help="Image size in pixels (32 to 256)."),
    seed: int | None = typer.Option(None, "--seed", help="World seed (default from the config)."),
    config: Path | None = typer.Option(None, "--config", help="ShapesConfig YAML (default: built-in)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    shard_size: int = SHARD_SIZE_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing shards of these splits."),
) -> None:
    """Render the synthetic shapes world into webdataset shards, a manifest and a sample grid PNG."""
    from unicode_mllm.config import load_config
    from unicode_mllm.data.shapes import ShapesConfig
    from unicode_mllm.data.shapes_dataset import write_shapes_dataset

    check_at_least(shard_size, 1, "--shard-size")
    ensure_writable_output(out, "--out", folder=True)
    overrides = list(set_)
    if size is not None:
        overrides.append(f"image_size={size}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    cfg = load_config(ShapesConfig, config, overrides)
    counts = {"train": train, "val": val, "heldout": val if heldout is None else heldout}
    for split, n in counts.items():
        if n < 0:
            raise UserError(f"--{split} must be >= 0, got {n}")
    result = write_shapes_dataset(cfg, out, counts, shard_size=shard_size, overwrite=overwrite)
    typer.echo(f"wrote {result.summary()} to {out}")
    typer.echo(f"sample grid: {result.grid_path}")


@data_app.command("from-folder")
def data_from_folder(
    folder: Path = typer.Argument(..., help="Folder of images (png, jpg, webp, bmp, gif); sidecar .txt = caption."),
    out: Path = SHARDS_OUT_OPTION,
    split: str = SPLIT_OPTION,
    shard_size: int = SHARD_SIZE_OPTION,
    overwrite: bool = OVERWRITE_SPLIT_OPTION,
) -> None:
    """Convert an image folder into webdataset shards; unreadable images are counted and listed."""
    from unicode_mllm.data.converters import convert_image_folder

    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found; pass an existing directory")
    _check_shard_output(split, shard_size, out)
    report = convert_image_folder(folder, out, split=split, maxcount=shard_size, overwrite=overwrite)
    typer.echo(report.summary())


@data_app.command("from-llava")
def data_from_llava(
    json_path: Path = typer.Argument(..., help="LLaVA-style conversation JSON (list of samples)."),
    images: Path = typer.Option(..., "--images", help="Root folder the samples' image paths are relative to."),
    out: Path = SHARDS_OUT_OPTION,
    split: str = SPLIT_OPTION,
    shard_size: int = SHARD_SIZE_OPTION,
    overwrite: bool = OVERWRITE_SPLIT_OPTION,
) -> None:
    """Convert LLaVA-style conversation JSON into shards; invalid samples are counted by reason."""
    from unicode_mllm.data.converters import convert_llava_json

    if not json_path.is_file():
        raise UserError(f"conversation file {json_path} not found; pass an existing JSON file")
    _check_shard_output(split, shard_size, out)
    report = convert_llava_json(json_path, images, out, split=split, maxcount=shard_size, overwrite=overwrite)
    typer.echo(report.summary())


@data_app.command("from-coco")
def data_from_coco(
    captions: Path = typer.Option(..., "--captions", help="COCO captions JSON, e.g. captions_train2017.json."),
    images: Path = typer.Option(..., "--images", help="Folder of the images the file names (e.g. train2017/)."),
    out: Path = SHARDS_OUT_OPTION,
    split: str = SPLIT_OPTION,
    shard_size: int = SHARD_SIZE_OPTION,
    overwrite: bool = OVERWRITE_SPLIT_OPTION,
) -> None:
    """Convert COCO captions into shards, one sample per image with all its captions; problems are counted."""
    from unicode_mllm.data.coco_vqa import convert_coco_captions

    _check_inputs({"--captions": captions}, images)
    _check_shard_output(split, shard_size, out)
    report = convert_coco_captions(captions, images, out, split=split, maxcount=shard_size, overwrite=overwrite)
    typer.echo(report.summary())


@data_app.command("from-vqav2")
def data_from_vqav2(
    questions: Path = typer.Option(..., "--questions", help="VQAv2 questions JSON (v2_OpenEnded_mscoco_*)."),
    annotations: Path | None = typer.Option(
        None, "--annotations", help="VQAv2 annotations JSON (answers); leave out for test-dev (no answers)."
    ),
    images: Path = typer.Option(..., "--images", help="Folder of the COCO images (e.g. train2014/)."),
    out: Path = SHARDS_OUT_OPTION,
    image_pattern: str = typer.Option(
        "COCO_{subset}_{image_id:012d}.jpg", "--image-pattern", help="Image file name of {subset} and {image_id}."
    ),
    subset: str | None = typer.Option(None, "--subset", help="Fills {subset} (default: the files' data_subtype)."),
    split: str = SPLIT_OPTION,
    shard_size: int = SHARD_SIZE_OPTION,
    overwrite: bool = OVERWRITE_SPLIT_OPTION,
) -> None:
    """Convert VQAv2 questions (+ annotations) into shards, one sample per image with its `qa` list."""
    from unicode_mllm.data.coco_vqa import convert_vqav2

    _check_inputs({"--questions": questions, "--annotations": annotations}, images)
    _check_shard_output(split, shard_size, out)
    report = convert_vqav2(
        questions,
        annotations,
        images,
        out,
        split=split,
        image_pattern=image_pattern,
        subset=subset,
        maxcount=shard_size,
        overwrite=overwrite,
    )
    typer.echo(report.summary())


@data_app.command("inspect")
def data_inspect(
    folder: Path = typer.Argument(..., help="A shard folder with manifest.json."),
    split: str | None = typer.Option(None, "--split", help="Read back this split only."),
    image_size: int | None = typer.Option(
        None, "--image-size", help="Check as a trainer at this size would read (default: decode only)."
    ),
    resize: str = typer.Option(
        "auto", "--resize", help="With --image-size: auto (exact for shapes, else center_crop), center_crop or exact."
    ),
) -> None:
    """Print the manifest and stream every sample back, reporting samples that cannot be decoded."""
    from unicode_mllm.data.image_policy import ImagePolicy, check_fixed_size
    from unicode_mllm.data.stream import SkipReport, StreamingDataset
    from unicode_mllm.runtime.progress import track
    from unicode_mllm.shard_manifest import read_manifest

    choices = ("auto", "center_crop", "exact")
    if resize not in choices:
        raise UserError(f"--resize {resize!r} is unknown; choose one of {', '.join(choices)}")
    if image_size is None and resize != "auto":
        raise UserError(f"--resize {resize} needs --image-size N (the size to check the images against)")
    manifest = read_manifest(folder)
    splits = [split] if split else sorted(manifest.splits)
    # The trainers' own reader and policy (evaluation form: the same skips, no random crops).
    sizing = {}
    if image_size is not None:
        check_at_least(image_size, 1, "--image-size")
        policy = ImagePolicy(resize=resize).for_eval()  # type: ignore[arg-type]  # checked against choices above
        sizing = {"image_size": image_size, "image_policy": policy}
        try:
            keys = {"shards_key": str(folder), "size_key": "--image-size", "resize_key": "--resize"}
            check_fixed_size(policy, manifest.image_size(), image_size, **keys)
        except UserError as exn:
            typer.echo(f"note: a trainer stops before step 1 here: {exn}")
    for name in splits:
        stream = StreamingDataset.from_folder(folder, name, shuffle=False, **sizing)
        report = SkipReport()
        n = sum(1 for _ in report.track(track(stream, f"reading {name}", total=manifest.split(name).num_samples)))
        typer.echo(f"{name}: {n} samples read; {report.summary()}")


@data_app.command("check-analyser")
def data_check_analyser(
    count: int = typer.Option(1000, "--count", help="Freshly rendered images per condition."),
    size: int = typer.Option(64, "--size", help="Image size in pixels."),
    seed: int = typer.Option(12345, "--seed", help="World seed (use one not used for training data)."),
) -> None:
    """Measure the shapes analyser on fresh renders: clean, with noise, with JPEG compression."""
    from unicode_mllm.data.shapes_dataset import measure_analyser

    check_at_least(count, 1, "--count")
    for line in measure_analyser(count=count, image_size=size, seed=seed):
        typer.echo(line)
