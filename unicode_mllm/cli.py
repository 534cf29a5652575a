"""The `unicode-mllm` command line: parses options, builds configs and calls library functions.

Errors print one line (`error: ...`) and exit non-zero; `--debug` shows the traceback instead.
Heavy imports happen inside each command so `--help` stays fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from unicode_mllm.errors import UserError

app = typer.Typer(
    name="unicode-mllm",
    help="UniCode: a unified visual-text codebook tokenizer and generative multimodal LLM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Build and inspect data sets (webdataset shards).", no_args_is_help=True)
app.add_typer(data_app, name="data")

log = logging.getLogger("unicode_mllm")

SET_HELP = "Override a config value, e.g. --set image_size=32 (repeatable)."


@app.callback()
def _main_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    log_level: str = typer.Option("INFO", "--log-level", help="Logging level (DEBUG, INFO, WARNING)."),
) -> None:
    from unicode_mllm.runtime.progress import setup_logging

    setup_logging(log_level.upper())
    # Our own rich bars report progress; transformers' tqdm bars ("Loading weights") only add noise.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------- data


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
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per tar shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing shards of these splits."),
) -> None:
    """Render the synthetic shapes world into webdataset shards, a manifest and a sample grid PNG."""
    from unicode_mllm.config import load_config
    from unicode_mllm.data.shapes import ShapesConfig
    from unicode_mllm.data.shapes_dataset import write_shapes_dataset

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
    folder: Path = typer.Argument(..., help="Folder of images (png, jpg, webp, bmp); sidecar .txt = caption."),
    out: Path = typer.Option(..., "--out", help="Output folder for shards and manifest."),
    split: str = typer.Option("train", "--split", help="Split name to write."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per tar shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing shards of this split."),
) -> None:
    """Convert an image folder into webdataset shards; unreadable images are counted and listed."""
    from unicode_mllm.data.converters import convert_image_folder

    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found; pass an existing directory")
    report = convert_image_folder(folder, out, split=split, maxcount=shard_size, overwrite=overwrite)
    typer.echo(report.summary())


@data_app.command("from-llava")
def data_from_llava(
    json_path: Path = typer.Argument(..., help="LLaVA-style conversation JSON (list of samples)."),
    images: Path = typer.Option(..., "--images", help="Root folder the samples' image paths are relative to."),
    out: Path = typer.Option(..., "--out", help="Output folder for shards and manifest."),
    split: str = typer.Option("train", "--split", help="Split name to write."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per tar shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing shards of this split."),
) -> None:
    """Convert LLaVA-style conversation JSON into shards; invalid samples are counted by reason."""
    from unicode_mllm.data.converters import convert_llava_json

    if not json_path.is_file():
        raise UserError(f"conversation file {json_path} not found; pass an existing JSON file")
    report = convert_llava_json(json_path, images, out, split=split, maxcount=shard_size, overwrite=overwrite)
    typer.echo(report.summary())


@data_app.command("inspect")
def data_inspect(
    folder: Path = typer.Argument(..., help="A shard folder with manifest.json."),
    split: str | None = typer.Option(None, "--split", help="Read back this split only."),
) -> None:
    """Print the manifest and stream every sample back, reporting samples that cannot be decoded."""
    from unicode_mllm.data.shards import read_manifest
    from unicode_mllm.data.stream import SkipReport, StreamingDataset
    from unicode_mllm.runtime.progress import track

    manifest = read_manifest(folder)
    splits = [split] if split else sorted(manifest.splits)
    for name in splits:
        stream = StreamingDataset.from_folder(folder, name, shuffle=False)
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

    for line in measure_analyser(count=count, image_size=size, seed=seed):
        typer.echo(line)


# ---------------------------------------------------------------------------------------- stage 0


@app.command("train-lm")
def train_lm_cmd(
    config: Path = typer.Option(..., "--config", help="Stage-0 YAML, e.g. configs/lm/tiny.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. --set train.steps=100."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: train.out_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
) -> None:
    """Stage 0: train the tiny text tokenizer and LLaMA on the shapes world's text (embedded default)."""
    from unicode_mllm.config import load_config
    from unicode_mllm.lm import LMTrainConfig, train_lm

    cfg = load_config(LMTrainConfig, config, set_)
    model_dir = train_lm(cfg, out_dir=out, resume=resume)
    typer.echo(f"language model saved to {model_dir} (load with AutoModelForCausalLM.from_pretrained)")


# ---------------------------------------------------------------------------------------- stage 1


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    config: Path = typer.Option(..., "--config", help="Stage-1 YAML, e.g. configs/tokenizer/tiny.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. --set train.steps=100."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: train.out_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
) -> None:
    """Stage 1: train the visual tokenizer whose codebook is the LLM's embedding table."""
    from tokenizer_training.config import TokenizerTrainConfig
    from tokenizer_training.trainer import train_tokenizer
    from unicode_mllm.config import load_config

    cfg = load_config(TokenizerTrainConfig, config, set_)
    result = train_tokenizer(cfg, out_dir=out, resume=resume)
    m = result.metrics
    typer.echo(f"tokenizer saved to {result.final_dir} after {result.steps} steps")
    typer.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))


@app.command("compare-codebook-modes")
def compare_codebook_modes_cmd(
    config: Path = typer.Option(..., "--config", help="Stage-1 YAML; its codebook.mode is replaced per run."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value (applies to every mode)."),
    out: Path = typer.Option(Path("runs/codebook_modes"), "--out", help="One sub-folder per mode."),
) -> None:
    """Stage-1 ablation: language_driven, frozen, dual and separate on the same data, steps and seed."""
    from tokenizer_training.compare_modes import compare_codebook_modes, rows_to_markdown
    from tokenizer_training.config import TokenizerTrainConfig
    from unicode_mllm.config import load_config

    cfg = load_config(TokenizerTrainConfig, config, set_)
    rows = compare_codebook_modes(cfg, out)
    table = rows_to_markdown(rows, cfg.data.eval_splits)
    (out / "comparison.md").write_text(table + "\n")
    typer.echo(table)


@app.command("reconstruct")
def reconstruct_cmd(
    images: list[Path] = typer.Argument(..., help="Image files to reconstruct."),
    model: Path = typer.Option(..., "--model", help="Tokenizer folder (save_pretrained output)."),
    out: Path = typer.Option(Path("reconstructions"), "-o", "--out", help="Output folder for PNGs."),
    lpips_trunk: str = typer.Option("auto", "--lpips-trunk", help="VGG16 trunk for LPIPS: auto, a path, or none."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or mps."),
) -> None:
    """Reconstruct images through a trained tokenizer; print PSNR and LPIPS per image."""
    from unicode_mllm.visual_tokenizer.reconstruct import reconstruct_files

    _require_model_dir(model, "tokenizer")
    for path in images:
        if not path.is_file():
            raise UserError(f"image {path} not found; pass existing image files")
    results = reconstruct_files(model, images, out, None if lpips_trunk == "none" else lpips_trunk, device)
    for r in results:
        lp = f"{r.lpips:.4f}" if r.lpips is not None else "n/a (no VGG16 trunk; pass --lpips-trunk PATH)"
        typer.echo(f"{r.source}: PSNR {r.psnr:.2f} dB, LPIPS {lp} -> {r.output}")


@app.command("tokenize")
def tokenize_cmd(
    model: Path = typer.Option(..., "--model", help="Tokenizer folder (save_pretrained output)."),
    shards: Path = typer.Option(..., "--shards", help="Input shard folder with manifest.json."),
    out: Path = typer.Option(..., "--out", help="Output shard folder (images + visual_token_ids)."),
    split: list[str] = typer.Option([], "--split", help="Splits to encode (default: all)."),
    batch_size: int = typer.Option(64, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing shards in --out."),
) -> None:
    """Pre-extract LLM token ids of every image of a shard set (stage 2 then skips the tokenizer)."""
    from unicode_mllm.visual_tokenizer.extract import extract_codes

    _require_model_dir(model, "tokenizer")
    summaries = extract_codes(model, shards, out, split or None, batch_size, device, overwrite)
    typer.echo(", ".join(f"{s.num_samples} {name}" for name, s in summaries.items()) + f" written to {out}")


def _require_model_dir(path: Path, what: str) -> None:
    if not (path / "config.json").is_file():
        raise UserError(f"{what} folder {path} not found or has no config.json; pass a save_pretrained folder")


# ---------------------------------------------------------------------------------------- demo


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("outputs/demo"), "--out", help="Working folder for data, models, report."),
    quick: bool = typer.Option(False, "--quick", help="Smoke-run profile (small data, few steps)."),
) -> None:
    """End-to-end demo on the embedded tiny preset (runs every stage implemented so far)."""
    from unicode_mllm.demo import run_demo

    run_demo(out, quick=quick)


# ---------------------------------------------------------------------------------------- entry


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 500 else text[:497] + "..."


def _click_kind(error: BaseException) -> str | None:
    """'Exit', 'Abort' or 'ClickException' for click's control-flow exceptions, else None.

    typer vendors its own copy of click, so match by class name within a click module rather than
    by identity with the `click` package's classes.
    """
    for cls in type(error).__mro__:
        if "click" in cls.__module__ and cls.__name__ in ("Exit", "Abort", "ClickException"):
            return cls.__name__
    return None


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors, non-zero exit, traceback only with --debug."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="unicode-mllm", standalone_mode=False)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except UserError as e:
        if debug:
            raise
        typer.echo(f"error: {_one_line(e)}", err=True)
        return 2
    except Exception as e:
        kind = _click_kind(e)
        if kind == "Exit":
            return e.exit_code
        if kind == "Abort":
            typer.echo("aborted", err=True)
            return 130
        if kind == "ClickException":  # usage errors: click prints them with the usage line
            e.show()
            return e.exit_code
        if debug:
            raise
        typer.echo(
            f"error: internal error ({type(e).__name__}: {_one_line(e)}); rerun with --debug for the traceback",
            err=True,
        )
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
