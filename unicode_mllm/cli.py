"""The `unicode-mllm` command line: parses options, builds configs and calls library functions.

Errors print one line (`error: ...`) and exit non-zero; `--debug` shows the traceback instead. Environment
problems (a full disk, a read-only output, a refused pickle) are user errors too: unicode_mllm/environment_errors.py.
Heavy imports happen inside each command so `--help` stays fast.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import typer

from unicode_mllm.cli_checks import (
    check_at_least,
    check_image_files,
    check_lpips_trunk,
    check_sampling,
    check_split_name,
    ensure_writable_output,
)
from unicode_mllm.environment_errors import environment_message
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.model_folders import require_visual_tokenizer

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
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@app.callback()
def _main_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    log_level: str = typer.Option("INFO", "--log-level", help="Logging level (DEBUG, INFO, WARNING, ERROR)."),
) -> None:
    from unicode_mllm.runtime.progress import setup_logging

    if log_level.upper() not in LOG_LEVELS:
        raise UserError(f"--log-level {log_level!r} is unknown; choose one of {', '.join(LOG_LEVELS)}")
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
    out: Path = typer.Option(..., "--out", help="Output folder for shards and manifest."),
    split: str = typer.Option("train", "--split", help="Split name to write."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per tar shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing shards of this split."),
) -> None:
    """Convert an image folder into webdataset shards; unreadable images are counted and listed."""
    from unicode_mllm.data.converters import convert_image_folder

    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found; pass an existing directory")
    check_split_name(split)
    check_at_least(shard_size, 1, "--shard-size")
    ensure_writable_output(out, "--out", folder=True)
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
    check_split_name(split)
    check_at_least(shard_size, 1, "--shard-size")
    ensure_writable_output(out, "--out", folder=True)
    report = convert_llava_json(json_path, images, out, split=split, maxcount=shard_size, overwrite=overwrite)
    typer.echo(report.summary())


def _check_inputs(files: dict[str, Path | None], images: Path) -> None:
    """Up-front checks of a converter's input files (option -> path; None is not given) and its --images folder."""
    for option, path in files.items():
        if path is not None and not path.is_file():
            raise UserError(f"{option} {path} not found; pass an existing JSON file")
    if not images.is_dir():
        raise UserError(f"--images {images} not found; pass the folder that holds the COCO images")


@data_app.command("from-coco")
def data_from_coco(
    captions: Path = typer.Option(..., "--captions", help="COCO captions JSON, e.g. captions_train2017.json."),
    images: Path = typer.Option(..., "--images", help="Folder of the images the file names (e.g. train2017/)."),
    out: Path = typer.Option(..., "--out", help="Output folder for shards and manifest."),
    split: str = typer.Option("train", "--split", help="Split name to write."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per tar shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing shards of this split."),
) -> None:
    """Convert COCO captions into shards, one sample per image with all its captions; problems are counted."""
    from unicode_mllm.data.coco_vqa import convert_coco_captions

    _check_inputs({"--captions": captions}, images)
    check_split_name(split)
    check_at_least(shard_size, 1, "--shard-size")
    ensure_writable_output(out, "--out", folder=True)
    report = convert_coco_captions(captions, images, out, split=split, maxcount=shard_size, overwrite=overwrite)
    typer.echo(report.summary())


@data_app.command("from-vqav2")
def data_from_vqav2(
    questions: Path = typer.Option(..., "--questions", help="VQAv2 questions JSON (v2_OpenEnded_mscoco_*)."),
    annotations: Path | None = typer.Option(
        None, "--annotations", help="VQAv2 annotations JSON (answers); leave out for test-dev (no answers)."
    ),
    images: Path = typer.Option(..., "--images", help="Folder of the COCO images (e.g. train2014/)."),
    out: Path = typer.Option(..., "--out", help="Output folder for shards and manifest."),
    image_pattern: str = typer.Option(
        "COCO_{subset}_{image_id:012d}.jpg", "--image-pattern", help="Image file name of {subset} and {image_id}."
    ),
    subset: str | None = typer.Option(None, "--subset", help="Fills {subset} (default: the files' data_subtype)."),
    split: str = typer.Option("train", "--split", help="Split name to write."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per tar shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing shards of this split."),
) -> None:
    """Convert VQAv2 questions (+ annotations) into shards, one sample per image with its `qa` list."""
    from unicode_mllm.data.coco_vqa import convert_vqav2

    _check_inputs({"--questions": questions, "--annotations": annotations}, images)
    check_split_name(split)
    check_at_least(shard_size, 1, "--shard-size")
    ensure_writable_output(out, "--out", folder=True)
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
    from unicode_mllm.data.shards import read_manifest
    from unicode_mllm.data.stream import SkipReport, StreamingDataset
    from unicode_mllm.runtime.progress import track

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


# ---------------------------------------------------------------------------------------- stage 0


@app.command("train-lm")
def train_lm_cmd(
    config: Path = typer.Option(..., "--config", help="Stage-0 YAML, e.g. configs/lm/tiny.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. --set train.steps=100."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: train.out_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    allow_changed: list[str] = typer.Option(
        [], "--allow-changed", help="With --resume: accept this changed config key (e.g. optim.lr; repeatable)."
    ),
) -> None:
    """Stage 0: train the tiny text tokenizer and LLaMA on the shapes world's text (embedded default)."""
    from unicode_mllm.config import load_config
    from unicode_mllm.lm import LMTrainConfig, train_lm

    cfg = load_config(LMTrainConfig, config, set_)
    model_dir = train_lm(cfg, out_dir=out, resume=resume, allow_changed=allow_changed)
    typer.echo(f"language model saved to {model_dir} (load with AutoModelForCausalLM.from_pretrained)")


# ---------------------------------------------------------------------------------------- stage 1


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    config: Path = typer.Option(..., "--config", help="Stage-1 YAML, e.g. configs/tokenizer/tiny.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. --set train.steps=100."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: train.out_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    allow_changed: list[str] = typer.Option(
        [], "--allow-changed", help="With --resume: accept this changed config key (e.g. optim.lr; repeatable)."
    ),
) -> None:
    """Stage 1: train the visual tokenizer whose codebook is the LLM's embedding table."""
    from tokenizer_training.config import TokenizerTrainConfig
    from tokenizer_training.trainer import train_tokenizer
    from unicode_mllm.config import load_config

    cfg = load_config(TokenizerTrainConfig, config, set_)
    result = train_tokenizer(cfg, out_dir=out, resume=resume, allow_changed=allow_changed)
    m = result.metrics
    typer.echo(f"tokenizer saved to {result.final_dir} after {result.steps} steps")
    typer.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))


@app.command("train-mllm")
def train_mllm_cmd(
    config: Path = typer.Option(..., "--config", help="Stage-2 YAML, e.g. configs/mllm/tiny.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. --set train.steps=100."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: train.out_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    allow_changed: list[str] = typer.Option(
        [], "--allow-changed", help="With --resume: accept this changed config key (e.g. optim.lr; repeatable)."
    ),
) -> None:
    """Stage 2: fine-tune the LLM to read and write images (VQA, captions, text-to-image, decompression)."""
    from unicode_mllm.config import load_config
    from unicode_mllm.training import MLLMTrainConfig, train_mllm

    cfg = load_config(MLLMTrainConfig, config, set_)
    result = train_mllm(cfg, out_dir=out, resume=resume, allow_changed=allow_changed)
    typer.echo(f"model saved to {result.final_dir} after {result.steps} steps")
    typer.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.metrics.items()))


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
    ensure_writable_output(out, "--out", folder=True)
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
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps."),
) -> None:
    """Reconstruct images through a trained tokenizer; print PSNR and LPIPS per image."""
    from unicode_mllm.visual_tokenizer.reconstruct import output_paths, reconstruct_files

    require_visual_tokenizer(model)  # one line naming what the folder is otherwise
    for path in images:
        if not path.is_file():
            raise UserError(f"image {path} not found; pass existing image files")
    check_lpips_trunk(lpips_trunk)
    ensure_writable_output(out, "-o/--out", folder=True)
    for output in output_paths(images, out):
        ensure_writable_output(output, "-o/--out")
    trunk = None if lpips_trunk == "none" else lpips_trunk
    report = reconstruct_files(model, images, out, trunk, device)
    for r in report.done:
        lp = f"{r.lpips:.4f}" if r.lpips is not None else "n/a (no VGG16 trunk; pass --lpips-trunk PATH)"
        typer.echo(f"{r.source}: PSNR {r.psnr:.2f} dB, LPIPS {lp} -> {r.output}")
    if report.failed:  # after every readable file was done and printed: one line naming each unreadable file
        raise UserError(f"{report.summary()}; re-export or remove the unreadable files")


@app.command("tokenize")
def tokenize_cmd(
    model: Path = typer.Option(..., "--model", help="Tokenizer folder (save_pretrained output)."),
    shards: Path = typer.Option(..., "--shards", help="Input shard folder with manifest.json."),
    out: Path = typer.Option(..., "--out", help="Output shard folder (images + visual_token_ids)."),
    split: list[str] = typer.Option([], "--split", help="Splits to encode (default: all)."),
    batch_size: int = typer.Option(64, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing shards in --out."),
) -> None:
    """Pre-extract LLM token ids of every image of a shard set (stage 2 then skips the tokenizer)."""
    from unicode_mllm.visual_tokenizer.extract import extract_codes

    require_visual_tokenizer(model)  # one line naming what the folder is otherwise
    check_at_least(batch_size, 1, "--batch-size")
    ensure_writable_output(out, "--out", folder=True)
    summaries = extract_codes(model, shards, out, split or None, batch_size, device, overwrite)
    typer.echo(", ".join(f"{s.num_samples} {name}" for name, s in summaries.items()) + f" written to {out}")


# ---------------------------------------------------------------------------------------- demo


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("outputs/demo"), "--out", help="Working folder for data, models, report."),
    quick: bool = typer.Option(False, "--quick", help="The quick profile (<= 5 minutes on 2 CPU cores)."),
    profile: str | None = typer.Option(
        None, "--profile", help="full (default, <= 30 minutes on 2 CPU cores), quick or smoke (the tests' profile)."
    ),
) -> None:
    """End-to-end demo on the embedded tiny preset: data, stages 0-2, evaluation -> OUT/report/index.html."""
    from unicode_mllm.demo import get_profile, run_demo

    if quick and profile not in (None, "quick"):
        raise UserError(f"--quick is the quick profile; drop it or --profile {profile}")
    if profile is not None:
        get_profile(profile)  # one-line error for an unknown name, before any work
    metrics = run_demo(out, quick=quick, profile_name=profile)
    typer.echo(f"report: {out / 'report' / 'index.html'} ({metrics['seconds'] / 60:.1f} minutes)")


# ---------------------------------------------------------------------------------------- inference


DTYPE_HELP = "The LM's weights: auto (bf16 on a GPU with native bf16, else fp32), fp32, bf16 or fp16 (GPU)."
REDUCE_HELP = (
    "Token reduction of text answers, key=value on top of the model's saved setting (repeatable), e.g. "
    "vision=mustdrop_merge, llm=ficoco_l, ficoco_l.layers=[1], vision=none."
)


def _with_token_reduction(mllm, specs: list[str]):
    """Apply --reduce key=value overrides to the model's TokenReductionConfig (ConfigError naming a bad key)."""
    if specs:
        from unicode_mllm.config import config_from_dict
        from unicode_mllm.token_reduction.config import TokenReductionConfig

        saved = mllm.token_reduction.to_dict()
        mllm.token_reduction = config_from_dict(TokenReductionConfig, saved, specs, source="--reduce")
    return mllm


def _load_inference_model(path: Path, device: str, dtype: str = "fp32", reduce: list[str] | None = None):
    """Load a saved UniCodeMLLM onto a device, in eval mode, its LM in `dtype` (the visual tokenizer stays fp32)
    and its token reduction overridden by `reduce`; UserError when the folder is not one."""
    from unicode_mllm.model import UniCodeMLLM
    from unicode_mllm.runtime.devices import select_device, select_dtype

    target = select_device(device)
    lm_dtype = select_dtype(dtype, target)  # UserError for an unknown name or fp16 on a CPU
    model = UniCodeMLLM.from_pretrained(path, dtype=lm_dtype)  # "... it is not a saved UniCodeMLLM" without config
    return _with_token_reduction(model, reduce or []).to(target).eval()


def _pair_questions(images: list[Path], questions: list[str]) -> tuple[list[Path | None], list[str]]:
    """--image/--question lists -> pairs: equal counts pair in order; one image or one question is shared."""
    if not questions:
        raise UserError('no question given; pass one, e.g. unicode-mllm ask --model DIR --image a.png "what is it?"')
    if not images:
        return [None] * len(questions), questions
    if len(images) != len(questions) and 1 not in (len(images), len(questions)):
        raise UserError(f"{len(images)} images but {len(questions)} questions; pass them in pairs, or one of either")
    check_image_files(images, "--image")  # a folder or a bad file fails before the model loads
    if len(images) == len(questions):
        return list(images), questions
    if len(images) == 1:
        return [images[0]] * len(questions), questions
    return list(images), questions * len(images)


@app.command("ask")
def ask_cmd(
    question: str | None = typer.Argument(None, help="The question (or use --question, repeatable)."),
    model: Path = typer.Option(..., "--model", help="A saved UniCodeMLLM folder."),
    image: list[Path] = typer.Option([], "--image", help="Image file; repeat to pair with repeated questions."),
    questions: list[str] = typer.Option([], "--question", help="A question; repeatable, paired with --image."),
    jsonl: Path | None = typer.Option(None, "--jsonl", help='Question file: {"image": PATH, "question": TEXT} lines.'),
    out: Path | None = typer.Option(None, "--out", help="Answers JSONL for --jsonl (default: standard output)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest answer in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy decoding."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample among the k most likely tokens."),
    top_p: float | None = typer.Option(None, "--top-p", help="Sample within the top-p probability mass."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling (per question, batch-independent)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions decoded together."),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    reduce: list[str] = typer.Option([], "--reduce", help=REDUCE_HELP),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print a single answer as it is decoded."),
) -> None:
    """Answer questions about images (VQA) with a trained UniCodeMLLM; --jsonl for a question file."""
    from unicode_mllm.generation import answer_questions
    from unicode_mllm.generation.answering import generate_answers, question_prompts
    from unicode_mllm.generation.question_files import answer_record, check_question_images, read_questions_jsonl
    from unicode_mllm.generation.sampling import resolve_seed

    settings = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
    )
    check_at_least(max_new_tokens, 1, "--max-new-tokens")
    check_at_least(batch_size, 1, "--batch-size")
    check_sampling(temperature, top_k, top_p)
    if jsonl is not None:
        if question or questions or image:
            raise UserError("--jsonl takes its questions and images from the file; drop the other questions/--image")
        ensure_writable_output(out, "--out")
        records = read_questions_jsonl(jsonl)
        check_question_images(records, jsonl)  # a bad image late in the file must not cost the answers before it
        mllm = _load_inference_model(model, device, dtype, reduce)
        settings["seed"] = resolve_seed(seed)  # one seed for the whole file: the chunks continue one request
        lines = []
        chunk = max(1, batch_size) * 4  # images are loaded and encoded one chunk at a time
        for start in range(0, len(records), chunk):
            part = records[start : start + chunk]
            prompts = question_prompts(mllm, [r.image for r in part], [r.question for r in part])
            answers = generate_answers(mllm, prompts, first_index=start, **settings)
            lines += [answer_record(r, a.text) for r, a in zip(part, answers, strict=True)]
        if out is None:
            typer.echo("\n".join(lines))
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("\n".join(lines) + "\n")
            typer.echo(f"{len(lines)} answers written to {out}")
        return
    if out is not None:
        raise UserError("--out writes the answers of a --jsonl question file; pass --jsonl too")
    pairs_images, pairs_questions = _pair_questions(list(image), [*questions, *([question] if question else [])])
    mllm = _load_inference_model(model, device, dtype, reduce)
    if len(pairs_questions) == 1 and stream:
        answer_questions(
            mllm, pairs_images, pairs_questions, stream=lambda _i, piece: typer.echo(piece, nl=False), **settings
        )
        typer.echo("")
        return
    answers = answer_questions(mllm, pairs_images, pairs_questions, **settings)
    for img, q, a in zip(pairs_images, pairs_questions, answers, strict=True):
        typer.echo(f"{img if img is not None else '(no image)'} | {q} -> {a.text}")


DEPTH_TEMPERATURES_HELP = (
    "One sampling temperature per code depth of a position, comma-separated, replacing --temperature "
    "(e.g. 1,0.5,0.5,0.5,0.5 for hq: top code at 1, bottom codes at 0.5)."
)


def _depth_temperatures(text: str | None) -> tuple[float, ...] | None:
    """'1,0.5,0.5' -> (1.0, 0.5, 0.5); None stays None. Raises UserError for anything else."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UserError(
            f"--depth-temperatures {text!r} is not a comma-separated list of numbers; write e.g. 1,0.5,0.5,0.5,0.5"
        ) from None


def _numbered_paths(out: Path, n: int) -> list[Path]:
    """out.png for one image; out_0.png ... out_{n-1}.png for several."""
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must name a .png file (e.g. -o drawing.png)")
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


@app.command("generate")
def generate_cmd(
    prompt: str = typer.Argument(..., help="The drawing instruction, e.g. 'a red circle at the top left'."),
    model: Path = typer.Option(..., "--model", help="A saved UniCodeMLLM folder."),
    out: Path = typer.Option(Path("generated.png"), "-o", "--out", help="PNG path (out_0.png ... for -n > 1)."),
    num_images: int = typer.Option(1, "-n", "--num-images", help="Images to draw."),
    temperature: float = typer.Option(1.0, "--temperature", help="1 samples the model; 0 (greedy) gives flat images."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample among the k most likely codes."),
    top_p: float | None = typer.Option(None, "--top-p", help="Sample within the top-p probability mass."),
    seed: int | None = typer.Option(None, "--seed", help="Seed (default: random, printed)."),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="Classifier-free guidance scale (1 = none)."),
    depth_temperatures: str | None = typer.Option(None, "--depth-temperatures", help=DEPTH_TEMPERATURES_HELP),
    batch_size: int = typer.Option(8, "--batch-size", help="Images decoded together."),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Text-to-image: write PNGs, a captioned grid (<out>_grid.png) and the settings/ids (<out>.json)."""
    import json

    from unicode_mllm.generation import check_prompt_text, generate_images
    from unicode_mllm.generation.guidance import check_cfg_scale
    from unicode_mllm.viz import caption_grid

    text = check_prompt_text(prompt, "prompt")
    if num_images < 1:
        raise UserError(f"-n must be >= 1, got {num_images}")
    paths = _numbered_paths(out, num_images)
    for path in [*paths, out.with_name(f"{out.stem}_grid.png"), out.with_suffix(".json")]:
        ensure_writable_output(path, "-o/--out")
    depth_temps = _depth_temperatures(depth_temperatures)
    check_sampling(temperature, top_k, top_p, depth_temps)
    check_cfg_scale(cfg_scale)
    mllm = _load_inference_model(model, device, dtype)
    result = generate_images(
        mllm,
        [text],
        num_images_per_prompt=num_images,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        cfg_scale=cfg_scale,
        seed=seed,
        batch_size=batch_size,
        depth_temperatures=depth_temps,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    images = result.images
    for path, img in zip(paths, images, strict=True):
        img.save(path)
    grid_path = out.with_name(f"{out.stem}_grid.png")
    captions = [f"#{i} {text}" for i in range(num_images)]
    caption_grid(images, captions, columns=min(4, num_images), cell_size=128).save(grid_path)
    record = {
        "prompt": text,
        "files": [str(p) for p in paths],
        "grid": str(grid_path),
        "settings": result.settings,
        "image_seeds": result.seeds,
        "token_ids": result.token_ids.tolist(),
    }
    out.with_suffix(".json").write_text(json.dumps(record) + "\n")
    seed_note = f" (seed {result.seed})" if result.seed is not None else ""
    typer.echo(f"wrote {', '.join(str(p) for p in paths)} and {grid_path}{seed_note}")


@app.command("chat")
def chat_cmd(
    model: Path = typer.Option(..., "--model", help="A saved UniCodeMLLM folder."),
    out_dir: Path = typer.Option(Path("chat_images"), "--out-dir", help="Where drawings are saved (image_NNN.png)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest answer in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="Answers: 0 = greedy."),
    image_temperature: float = typer.Option(1.0, "--image-temperature", help="Drawings: sampling temperature."),
    image_top_k: int | None = typer.Option(None, "--image-top-k", help="Drawings: sample among the k best codes."),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="Drawings: classifier-free guidance scale."),
    seed: int | None = typer.Option(None, "--seed", help="Session seed (default: random)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    reduce: list[str] = typer.Option([], "--reduce", help=REDUCE_HELP + " Drawing turns never reduce."),
) -> None:
    """Multi-turn chat on standard input: questions, /image PATH, /draw TEXT (or draw: TEXT), /reset, /quit."""
    from unicode_mllm.generation import ChatSession, ChatSettings
    from unicode_mllm.generation.chat_repl import CHAT_HELP, run_chat

    settings = ChatSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        image_temperature=image_temperature,
        image_top_k=image_top_k,
        cfg_scale=cfg_scale,
        seed=seed,
    )  # checks every setting: one error before loading, not one per message
    ensure_writable_output(out_dir, "--out-dir", folder=True)
    session = ChatSession(_load_inference_model(model, device, dtype, reduce), settings)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach run_chat, which reports the line
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(CHAT_HELP)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    run_chat(
        session,
        sys.stdin,
        out_dir,
        write,
        lambda line: typer.echo(line, err=True),
        prompt=(lambda: write("you> ")) if interactive else None,
    )


@app.command("serve")
def serve_cmd(
    model: Path = typer.Option(..., "--model", help="A saved UniCodeMLLM folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(7860, "--port", help="Port to listen on."),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Web demo in the browser (gradio: the demo extra): Ask, Draw, Reconstruct and Chat tabs."""
    from unicode_mllm.web_demo import check_port_free, require_gradio, serve

    require_gradio()  # a missing extra or a taken port fail before the model loads
    check_port_free(host, port)
    mllm = _load_inference_model(model, device, dtype)
    typer.echo(f"serving {model} on http://{host}:{port} (Ctrl+C stops)")
    serve(mllm, host, port)


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


# ---------------------------------------------------------------------------------------- eval

eval_app = typer.Typer(
    help="Evaluate a visual tokenizer (reconstruction, code usage) or a model (VQA, text-to-image).",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")


def _write_report(report: dict, out: Path | None) -> None:
    import json

    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    typer.echo(f"report: {out}")


def _load_mllm(model: Path, device: str, method: str, reduce: list[str] | None = None):
    """UniCodeMLLM.from_pretrained(model) on `device`, checked to offer `method` (answer / generate_images), its
    token reduction overridden by `reduce`."""
    from unicode_mllm.model import UniCodeMLLM
    from unicode_mllm.runtime.devices import select_device

    mllm = _with_token_reduction(UniCodeMLLM.from_pretrained(model), reduce or []).to(select_device(device)).eval()
    if not callable(getattr(mllm, method, None)):
        raise UserError(f"this UniCodeMLLM has no {method}() method; update unicode-mllm to evaluate {model}")
    return mllm


@eval_app.command("tokenizer")
def eval_tokenizer_cmd(
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Visual tokenizer folder (save_pretrained output)."),
    data: Path | None = typer.Option(None, "--data", help="Shard folder with manifest.json (split: --split)."),
    split: str | None = typer.Option(None, "--split", help="Split of --data to evaluate (default: val)."),
    folder: Path | None = typer.Option(None, "--folder", help="Image folder; unreadable files are counted skips."),
    photos: bool = typer.Option(False, "--photos", help="The real photos shipped with scikit-image (out of domain)."),
    photo: list[str] = typer.Option([], "--photo", help="With --photos: evaluate only this photo (repeatable)."),
    out: Path | None = typer.Option(None, "--out", help="Write the JSON report here."),
    grid: Path | None = typer.Option(None, "--grid", help="Write a PNG grid of original | reconstruction pairs here."),
    lpips_trunk: str = typer.Option(
        "auto", "--lpips-trunk", help="VGG16 trunk for LPIPS: auto (torch cache), a path, random (tests), or none."
    ),
    batch_size: int = typer.Option(16, "--batch-size"),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate at most this many images."),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps."),
    inception_weights: Path | None = typer.Option(
        None,
        "--inception-weights",
        help="FID Inception weights for rFID (pt_inception-2015-12-05-6726825d.pth); default: the torch hub cache, "
        "else rFID is not measured. Never downloaded.",
    ),
    feature_extractor: str | None = typer.Option(
        None, "--feature-extractor", help="rFID network: inception (default), or random-for-tests (not FID)."
    ),
) -> None:
    """PSNR, SSIM, LPIPS, rFID and per-depth code usage of a visual tokenizer on shards, a folder or photos."""
    from unicode_mllm.evaluation import ImageSet, eval_visual_tokenizer
    from unicode_mllm.evaluation.fid import INCEPTION, load_feature_extractor
    from unicode_mllm.runtime.devices import select_device

    require_visual_tokenizer(tokenizer)
    chosen = [name for name, given in (("--data", data), ("--folder", folder), ("--photos", photos)) if given]
    if len(chosen) != 1:
        raise UserError(f"pick exactly one image set: --data DIR [--split S], --folder DIR or --photos (got {chosen})")
    if split is not None and data is None:
        raise UserError("--split selects a split of --data; pass --data DIR as well")
    if photo and not photos:
        raise UserError("--photo picks photos of --photos; pass --photos as well")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise UserError(f"--batch-size and --limit must be >= 1 (got {batch_size} and {limit})")
    check_lpips_trunk(lpips_trunk)
    ensure_writable_output(out, "--out")
    ensure_writable_output(grid, "--grid")
    if data is not None:
        images = ImageSet.shards(data, split or "val")
    elif folder is not None:
        images = ImageSet.folder(folder)
    else:
        images = ImageSet.photos(photo or None)
    run_device = select_device(device)
    rfid = INCEPTION  # measured when the weights are in the torch hub cache, else "not measured: <reason>"
    if feature_extractor is not None or inception_weights is not None:  # asked for: a bad file is an error, now
        rfid = load_feature_extractor(feature_extractor or INCEPTION, inception_weights, run_device)
    result = eval_visual_tokenizer(
        tokenizer,
        images,
        lpips_trunk=None if lpips_trunk == "none" else lpips_trunk,
        batch_size=batch_size,
        limit=limit,
        device=run_device,
        grid_path=grid,
        rfid=rfid,
    )
    for line in result.summary_lines():
        typer.echo(line)
    if grid is not None:
        typer.echo(f"grid: {grid}")
    _write_report(result.to_dict(), out)


VQA_METRIC_HELP = "auto (VQAv2 accuracy for a question with >= 4 reference answers, else exact match), vqav2 or exact."
EVAL_OUT_HELP = "The JSON report (default: MODEL/eval/<name>.json); the .md table and the _results.json go next to it."


def _eval_outputs(model: Path, name: str, out: Path | None) -> tuple[Path, Path, Path]:
    """The JSON report, markdown table and official-format results of an `eval vqa`/`eval pope` run: --out and
    files next to it, else MODEL/eval/<name>.json, <name>.md and <name>_results.json; all checked writable."""
    if not model.is_dir():
        raise UserError(f"--model {model} is not a folder; pass a saved UniCodeMLLM folder")
    if out is not None and out.suffix.lower() == ".md":
        json_out = out.with_suffix(".json")
        raise UserError(f"--out {out} names the JSON report (the .md table goes next to it); e.g. --out {json_out}")
    report = out if out is not None else model / "eval" / f"{name}.json"
    paths = (report, report.with_suffix(".md"), report.with_name(f"{report.stem}_results.json"))
    for path in paths:
        ensure_writable_output(path, "--out")
    return paths


def _write_eval_outputs(report: dict, markdown: str, results: list | None, paths: tuple[Path, Path, Path]) -> None:
    import json

    _write_report(report, paths[0])
    paths[1].write_text(markdown)
    typer.echo(f"table: {paths[1]}")
    if results is not None:
        paths[2].write_text(json.dumps(results) + "\n")
        typer.echo(f"answers in the official results format: {paths[2]}")


def _eval_settings(model: Path, data: dict, decoding: dict, limit: int | None, reduce: list[str]) -> dict[str, str]:
    """The settings rows of the markdown table."""
    rows = {"model": str(model), **{f"data: {k}": str(v) for k, v in data.items() if v is not None}}
    rows["decoding"] = f"greedy, at most {decoding['max_new_tokens']} new tokens, batches of {decoding['batch_size']}"
    rows["limit"] = "all questions" if limit is None else f"the first {limit} questions"
    if reduce:
        rows["token reduction"] = ", ".join(reduce)
    return rows


@eval_app.command("vqa")
def eval_vqa_cmd(
    model: Path = typer.Option(..., "--model", help="UniCodeMLLM folder (save_pretrained output)."),
    data: Path | None = typer.Option(
        None, "--data", help="Shard folder: shapes, or `data from-vqav2` (questions from its samples' qa)."
    ),
    split: str | None = typer.Option(None, "--split", help="Split of --data (default: heldout)."),
    jsonl: Path | None = typer.Option(
        None, "--jsonl", help='JSONL of {"image", "question", "answers" (or "answer")} lines.'
    ),
    image_root: Path | None = typer.Option(None, "--image-root", help="Folder --jsonl image paths are relative to."),
    questions: Path | None = typer.Option(
        None,
        "--questions",
        help="Official question file: VQAv2 (v2_OpenEnded_mscoco_val2014_questions.json, with --annotations) or GQA "
        "(testdev_balanced_questions.json).",
    ),
    annotations: Path | None = typer.Option(
        None, "--annotations", help="VQAv2 annotations (v2_mscoco_val2014_annotations.json): the human answers."
    ),
    images: Path | None = typer.Option(None, "--images", help="Folder of the --questions images (e.g. val2014/)."),
    image_pattern: str | None = typer.Option(
        None,
        "--image-pattern",
        help="Image file name of {subset} and {image_id} (default: COCO_{subset}_{image_id:012d}.jpg for VQAv2, "
        "{image_id}.jpg for GQA).",
    ),
    subset: str | None = typer.Option(None, "--subset", help="Fills {subset} (default: the files' data_subtype)."),
    metric: str = typer.Option("auto", "--metric", help=VQA_METRIC_HELP),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Longest answer, in tokens."),
    batch_size: int = typer.Option(16, "--batch-size"),
    limit: int | None = typer.Option(None, "--limit", help="Ask at most this many questions."),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps."),
    reduce: list[str] = typer.Option([], "--reduce", help=REDUCE_HELP),
    out: Path | None = typer.Option(None, "--out", help=EVAL_OUT_HELP),
) -> None:
    """VQA accuracy per answer and question type: VQAv2's official metric or exact match (greedy answers)."""
    from unicode_mllm.data.shards import read_manifest
    from unicode_mllm.evaluation import SkipCounts
    from unicode_mllm.evaluation.vqa import METRICS, eval_vqa, jsonl_vqa_items, question_file_items, shapes_vqa_items
    from unicode_mllm.generation.question_files import read_utf8_lines

    chosen = [name for name, given in (("--data", data), ("--jsonl", jsonl), ("--questions", questions)) if given]
    if len(chosen) != 1:
        raise UserError(
            "pick exactly one question set: --data DIR [--split S], --jsonl FILE or --questions FILE "
            f"[--annotations FILE] --images DIR (got {', '.join(chosen) or 'none'})"
        )
    if split is not None and data is None:
        raise UserError("--split selects a split of --data; pass --data DIR as well")
    if image_root is not None and jsonl is None:
        raise UserError("--image-root is the folder of --jsonl's images; with --questions, pass --images")
    extras = [o for o, v in (("--annotations", annotations), ("--images", images)) if v is not None]
    extras += [o for o, v in (("--image-pattern", image_pattern), ("--subset", subset)) if v is not None]
    if extras and questions is None:
        raise UserError(f"{', '.join(extras)} go with --questions FILE; pass it, or drop them")
    if questions is not None and images is None:
        raise UserError("--questions needs --images DIR, the folder of its images (e.g. val2014/)")
    if metric not in METRICS:
        raise UserError(f"--metric {metric!r} is unknown; choose one of {', '.join(METRICS)}")
    if batch_size < 1 or max_new_tokens < 1 or (limit is not None and limit < 1):
        raise UserError(
            f"--batch-size, --max-new-tokens and --limit must be >= 1 (got {batch_size}, {max_new_tokens}, {limit})"
        )
    for option, path in (("--questions", questions), ("--annotations", annotations), ("--jsonl", jsonl)):
        if path is not None and not path.is_file():
            raise UserError(f"{option} {path} not found; pass an existing {'JSONL' if path is jsonl else 'JSON'} file")
    skips = SkipCounts()
    if data is not None:
        read_manifest(data)  # a missing or foreign folder fails here, not after the model is loaded
        name = f"vqa_{data.name}_{split or 'heldout'}"
        source = {"kind": "shards", "data_dir": str(data), "split": split or "heldout"}
        items = shapes_vqa_items(data, split or "heldout", skips)
    elif jsonl is not None:
        read_utf8_lines(jsonl)  # a file that is not UTF-8 fails here, not after the model is loaded
        name, source = f"vqa_{jsonl.stem}", {"kind": "jsonl", "path": str(jsonl)}
        items = jsonl_vqa_items(jsonl, skips, image_root)
    else:
        assert questions is not None and images is not None
        name = f"vqa_{questions.stem}"
        items, source = question_file_items(
            questions, annotations, images, skips, image_pattern=image_pattern, subset=subset
        )  # read and checked now: a bad file fails before the model loads
    paths = _eval_outputs(model, name if limit is None else f"{name}_limit{limit}", out)
    mllm = _load_mllm(model, device, "answer", reduce)

    def answer_fn(batch_images: list, batch_questions: list[str]) -> list[str]:
        return mllm.answer(
            batch_images, batch_questions, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size
        )

    result = eval_vqa(answer_fn, items, batch_size=batch_size, limit=limit, source=source, skips=skips, metric=metric)
    for line in result.summary_lines():
        typer.echo(line)
    decoding = {
        "model": str(model),
        "greedy": True,
        "max_new_tokens": max_new_tokens,
        "temperature": 0.0,
        "batch_size": batch_size,
        "reduce": list(reduce),
    }
    settings = {"command": "eval vqa", "model": str(model), "metric": result.metric_name, "limit": limit}
    report = {**result.to_dict(), "decoding": decoding, "settings": settings}
    markdown = result.to_markdown(f"VQA: {name}", _eval_settings(model, source, decoding, limit, reduce))
    _write_eval_outputs(report, markdown, result.official_results(), paths)


@eval_app.command("pope")
def eval_pope_cmd(
    model: Path = typer.Option(..., "--model", help="UniCodeMLLM folder (save_pretrained output)."),
    questions: Path = typer.Option(
        ..., "--questions", help="POPE question file (JSON lines), e.g. coco_pope_random.json."
    ),
    images: Path = typer.Option(..., "--images", help="Folder of the POPE images (val2014/ for the COCO sets)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Longest answer, in tokens."),
    batch_size: int = typer.Option(16, "--batch-size"),
    limit: int | None = typer.Option(None, "--limit", help="Ask at most this many questions."),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps."),
    reduce: list[str] = typer.Option([], "--reduce", help=REDUCE_HELP),
    out: Path | None = typer.Option(None, "--out", help=EVAL_OUT_HELP),
) -> None:
    """POPE yes/no questions (object hallucination): accuracy, precision, recall, F1, yes-ratio (greedy answers)."""
    from unicode_mllm.evaluation import SkipCounts
    from unicode_mllm.evaluation.pope import eval_pope, pope_items

    if batch_size < 1 or max_new_tokens < 1 or (limit is not None and limit < 1):
        raise UserError(
            f"--batch-size, --max-new-tokens and --limit must be >= 1 (got {batch_size}, {max_new_tokens}, {limit})"
        )
    skips = SkipCounts()
    items = pope_items(questions, images, skips)  # read and checked now: a bad file fails before the model loads
    name = f"pope_{questions.stem}"
    paths = _eval_outputs(model, name if limit is None else f"{name}_limit{limit}", out)
    mllm = _load_mllm(model, device, "answer", reduce)

    def answer_fn(batch_images: list, batch_questions: list[str]) -> list[str]:
        return mllm.answer(
            batch_images, batch_questions, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size
        )

    source = {"kind": "pope", "questions": str(questions), "images": str(images)}
    result = eval_pope(answer_fn, items, source=source, skips=skips, batch_size=batch_size, limit=limit)
    for line in result.summary_lines():
        typer.echo(line)
    decoding = {
        "model": str(model),
        "greedy": True,
        "max_new_tokens": max_new_tokens,
        "temperature": 0.0,
        "batch_size": batch_size,
        "reduce": list(reduce),
    }
    settings = {"command": "eval pope", "model": str(model), "metric": "pope", "limit": limit}
    report = {**result.to_dict(), "decoding": decoding, "settings": settings}
    markdown = result.to_markdown(f"POPE: {name}", _eval_settings(model, source, decoding, limit, reduce))
    _write_eval_outputs(report, markdown, None, paths)


@eval_app.command("t2i")
def eval_t2i_cmd(
    model: Path = typer.Option(..., "--model", help="UniCodeMLLM folder (save_pretrained output)."),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Shapes shard folder the model was trained on (analyser score, seen vs held-out pairs), or a shard / "
        "img2dataset folder whose samples have captions (FID, KID, IS against its images).",
    ),
    split: str | None = typer.Option(
        None, "--split", help="Split of a caption --data folder (default: val, else its only split)."
    ),
    captions: Path | None = typer.Option(
        None, "--captions", help="COCO captions file (captions_val2017.json): FID, KID, IS against --images."
    ),
    images: Path | None = typer.Option(None, "--images", help="With --captions: the folder of its images (val2017/)."),
    count: int = typer.Option(
        50,
        "--count",
        help="Shapes: prompts per group (seen = val, heldout = heldout split). Captions: images to generate "
        "(the first caption of each of the first N images).",
    ),
    start: int = typer.Option(0, "--start", help="First world sample index of each split (shapes)."),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_k: int | None = typer.Option(None, "--top-k"),
    top_p: float | None = typer.Option(None, "--top-p"),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="Classifier-free guidance scale (1 = off)."),
    depth_temperatures: str | None = typer.Option(None, "--depth-temperatures", help=DEPTH_TEMPERATURES_HELP),
    seed: int | None = typer.Option(
        0, "--seed", help="Sampling seed; batch i of --batch-size prompts is generated with seed + i."
    ),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps."),
    inception_weights: Path | None = typer.Option(
        None,
        "--inception-weights",
        help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth); default: the torch hub cache. "
        "Never downloaded.",
    ),
    feature_extractor: str | None = typer.Option(
        None, "--feature-extractor", help="inception (default), or random-for-tests (a random network: not FID)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="JSON report (a markdown table is written beside it); default MODEL/eval/t2i-NAME.json."
    ),
    grid: Path | None = typer.Option(None, "--grid", help="Write a PNG grid of generations with their prompts here."),
) -> None:
    """Text-to-image: the shapes analyser's score (seen vs held-out pairs) on a shapes folder, or FID, KID and IS
    of one image per caption against the real images (COCO captions, a from-coco or img2dataset folder)."""
    import itertools

    from unicode_mllm.data.shards import read_manifest
    from unicode_mllm.evaluation import eval_t2i, shapes_config_from_manifest, shapes_t2i_prompts
    from unicode_mllm.evaluation.caption_sets import CaptionSet
    from unicode_mllm.evaluation.fid import (
        INCEPTION,
        DistributionMetrics,
        load_feature_extractor,
        try_feature_extractor,
    )
    from unicode_mllm.evaluation.t2i import eval_t2i_captions, results_markdown, write_results
    from unicode_mllm.generation.guidance import check_cfg_scale
    from unicode_mllm.runtime.devices import select_device

    if count < 1 or batch_size < 1 or start < 0:
        raise UserError(f"--count and --batch-size must be >= 1 and --start >= 0 (got {count}, {batch_size}, {start})")
    depth_temps = _depth_temperatures(depth_temperatures)
    check_sampling(temperature, top_k, top_p, depth_temps)
    check_cfg_scale(cfg_scale)
    if (captions is None) != (images is None):
        raise UserError("--captions FILE and --images DIR go together (the COCO layout); pass both")
    if captions is not None and data is not None:
        raise UserError("pick one set: --data DIR, or --captions FILE --images DIR")
    caption_set, shapes_cfg = None, None
    if captions is not None:
        caption_set = CaptionSet.coco(captions, images)
    elif data is not None:
        source = read_manifest(data).source_generator_config()
        if isinstance(source, dict) and source.get("generator") == "shapes":
            shapes_cfg = shapes_config_from_manifest(data)
        else:
            caption_set = CaptionSet.shards(data, split)
    if split is not None and caption_set is None:
        raise UserError("--split selects a split of a caption --data folder; shapes prompts come from val and heldout")
    if start != 0 and caption_set is not None:
        raise UserError("--start picks shapes world samples; captions are always the first --count images")
    prompts = shapes_t2i_prompts(shapes_cfg, count, start=start) if caption_set is None else []
    name = f"{caption_set.name}-n{count}" if caption_set is not None else f"shapes-n{count}"
    out = out if out is not None else model / "eval" / f"t2i-{name}.json"
    ensure_writable_output(out, "--out")
    ensure_writable_output(grid, "--grid")
    fid_device = select_device(device)
    fid_note = None
    if caption_set is not None or feature_extractor is not None or inception_weights is not None:
        extractor = load_feature_extractor(feature_extractor or INCEPTION, inception_weights, fid_device)
    else:  # beside the shapes score, only when the weights are there
        extractor, fid_note = try_feature_extractor(INCEPTION, None, fid_device)
    metrics = DistributionMetrics(extractor, device=fid_device) if extractor is not None else None
    mllm = _load_mllm(model, device, "generate_images")
    batches = itertools.count()

    def generate_fn(batch_prompts: list[str]) -> list:
        index = next(batches)
        return mllm.generate_images(
            batch_prompts,
            num_images_per_prompt=1,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            cfg_scale=cfg_scale,
            seed=None if seed is None else seed + index,
            batch_size=batch_size,
            depth_temperatures=depth_temps,
        )

    image_size = mllm.visual_tokenizer.config.image_size
    if caption_set is not None:
        assert metrics is not None
        result = eval_t2i_captions(
            generate_fn, caption_set, metrics, count=count, image_size=image_size, batch_size=batch_size, grid_path=grid
        )
        title, num_images = f"Text-to-image on {caption_set.name}", result.num_images
        data_files = caption_set.describe()
    else:
        result = eval_t2i(
            generate_fn,
            prompts,
            cfg=shapes_cfg,
            batch_size=batch_size,
            grid_path=grid,
            metrics=metrics,
            metrics_note=fid_note,
        )
        title, num_images = "Text-to-image on the shapes world", len(prompts)
        data_files = {"kind": "shapes", "data_dir": str(data.resolve()) if data is not None else None}
    for line in result.summary_lines():
        typer.echo(line)
    if grid is not None:
        typer.echo(f"grid: {grid}")
    sampling = {
        "model": str(model),
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "cfg_scale": cfg_scale,
        "depth_temperatures": depth_temps,
        "seed": seed,
        "batch_size": batch_size,  # with a seed, the images depend on the batching (batch i: seed + i)
    }
    settings = {
        **sampling,
        "model": str(model.resolve()),
        "num_images": num_images,
        "resolution": image_size,
        "feature_extractor": extractor.name if extractor is not None else None,
        "inception_weights": str(extractor.weights) if extractor is not None and extractor.weights else None,
        "data": data_files,
    }
    report = {**result.to_dict(), "sampling": sampling, "settings": settings}
    json_path, md_path = write_results(report, results_markdown(title, result.markdown_rows(), settings), out)
    typer.echo(f"report: {json_path}; table: {md_path}")


@eval_app.command("compressors")
def eval_compressors_cmd(
    config: Path = typer.Option(..., "--config", help="Stage-2 YAML, e.g. configs/mllm/tiny.yaml (the shared budget)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value (applies to every run)."),
    compressors: str | None = typer.Option(
        None, "--compressors", help="Comma-separated presets or compressor names (default: all eight)."
    ),
    out: Path = typer.Option(Path("runs/compressor_ablation"), "--out", help="One run folder per compressor."),
    prefill_batch_size: int = typer.Option(16, "--prefill-batch-size", help="VQA prompts in the timed batch."),
    prefill_repeats: int = typer.Option(10, "--prefill-repeats", help="Timed forward passes (after one warm-up)."),
) -> None:
    """Stage-2 compressor ablation: equal budgets; tokens/image, prefill time, training time, VQA accuracy."""
    from unicode_mllm.config import load_config
    from unicode_mllm.evaluation.compressor_ablation import (
        parse_compressor_list,
        rows_to_markdown,
        run_compressor_ablation,
    )
    from unicode_mllm.training import MLLMTrainConfig

    cfg = load_config(MLLMTrainConfig, config, set_)
    check_at_least(prefill_batch_size, 1, "--prefill-batch-size")
    check_at_least(prefill_repeats, 1, "--prefill-repeats")
    ensure_writable_output(out, "--out", folder=True)
    rows = run_compressor_ablation(
        cfg,
        out,
        parse_compressor_list(compressors),
        prefill_batch_size=prefill_batch_size,
        prefill_repeats=prefill_repeats,
    )
    typer.echo(rows_to_markdown(rows, cfg.eval.splits))
    typer.echo(f"report: {out / 'comparison.md'} and {out / 'comparison.json'}")


@eval_app.command("highres")
def eval_highres_cmd(
    model: Path = typer.Option(..., "--model", help="UniCodeMLLM folder (save_pretrained output), the common start."),
    data: Path | None = typer.Option(None, "--data", help="Shapes shard folder the model was trained on (its world)."),
    paths: str = typer.Option("single,s2,inf_llava", "--paths", help="Comma-separated: single, s2, inf_llava."),
    scale: int = typer.Option(2, "--scale", help="Image side = scale x the visual tokenizer's image size."),
    steps: int = typer.Option(200, "--steps", help="Fine-tuning steps per path (0: score the paths as they are)."),
    train_records: int = typer.Option(200, "--train-records", help="Train-split images to fine-tune on."),
    eval_records: int = typer.Option(50, "--eval-records", help="Images per eval split (val, heldout)."),
    lr: float = typer.Option(1e-4, "--lr"),
    batch_size: int = typer.Option(16, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps."),
    out: Path = typer.Option(Path("runs/highres"), "--out", help="Folder for highres.md and highres.json."),
) -> None:
    """High-resolution check: small objects at 2x size read by one downscaled view, S^2 or INF-LLaVA (VQA)."""
    from unicode_mllm.evaluation.highres import HighResConfig, rows_to_markdown, run_highres_check
    from unicode_mllm.evaluation.t2i import shapes_config_from_manifest
    from unicode_mllm.runtime.devices import select_device

    cfg = HighResConfig(
        paths=tuple(p.strip() for p in paths.split(",") if p.strip()),
        scale=scale,
        train_records=train_records,
        eval_records=eval_records,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
    )
    cfg.validate()
    if not math.isfinite(lr):
        raise UserError(f"--lr must be a finite number >= 0, got {lr}")
    ensure_writable_output(out, "--out", folder=True)
    shapes = shapes_config_from_manifest(data) if data is not None else None
    rows = run_highres_check(model, cfg, shapes=shapes, out_dir=out, device=select_device(device))
    typer.echo(rows_to_markdown(rows, cfg.eval_splits, cfg.steps))
    typer.echo(f"report: {out / 'highres.md'} and {out / 'highres.json'}")


@eval_app.command("ablation")
def eval_ablation_cmd(
    out: Path = typer.Option(..., "--out", help="Run folder: data, LM, one sub-folder per setting, ablation.md."),
    profile: str = typer.Option("quick", "--profile", help="quick or full (the demo profiles' steps and minutes)."),
    lm: Path | None = typer.Option(None, "--lm", help="A stage-0 LM folder to share (default: train one)."),
    data: Path | None = typer.Option(None, "--data", help="A shapes shard folder (default: write one)."),
    rebuild_table: bool = typer.Option(
        False, "--rebuild-table", help="Only re-render ablation.md from the ablation.json of a finished run in --out."
    ),
) -> None:
    """The paper's ablation: codebook modes (language_driven, frozen, dual, separate) and stage 2 without
    decompression pre-training, equal budgets, one table of VQA, text-to-image and PSNR."""
    from unicode_mllm.evaluation import ablation

    if rebuild_table:
        typer.echo(ablation.rebuild_table(out).read_text().rstrip())
        return
    if profile not in ablation.ABLATION_PROFILES:
        raise UserError(f"--profile {profile!r} is unknown; choose one of {list(ablation.ABLATION_PROFILES)}")
    for name, path in (("--lm", lm), ("--data", data)):
        if path is not None and not path.is_dir():
            raise UserError(f"{name} {path} is not a folder; pass an existing one or leave {name} out")
    ensure_writable_output(out, "--out", folder=True)
    ablation.run_ablation(out, profile, lm_dir=lm, data_dir=data)
    typer.echo((out / "ablation.md").read_text().rstrip())
    typer.echo(f"table: {out / 'ablation.md'}; every number: {out / 'ablation.json'}")


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
        message = environment_message(e)  # a full disk, a read-only output, a refused pickle: the user's to fix
        if message is not None:
            typer.echo(f"error: {_one_line(message)}", err=True)
            return 2
        typer.echo(
            f"error: internal error ({type(e).__name__}: {_one_line(e)}); rerun with --debug for the traceback",
            err=True,
        )
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
