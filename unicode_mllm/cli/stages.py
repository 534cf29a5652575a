"""The pipeline's stages from the command line: train each (`train-lm`, `train-tokenizer`, `train-mllm`), compare
stage 1's codebook modes, use a trained visual tokenizer (`reconstruct`, `tokenize`), and run them all (`demo`)."""

from __future__ import annotations

from pathlib import Path

import typer

from unicode_mllm.cli.app import app
from unicode_mllm.cli.checks import check_at_least, check_lpips_trunk, ensure_writable_output
from unicode_mllm.cli.options import DEVICE_OPTION
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.model_folders import require_visual_tokenizer

# A training run: `--config` names the stage's YAML; these four are the same for every stage.
RUN_SET_OPTION = typer.Option([], "--set", help="Override a config value, e.g. --set train.steps=100.")
RUN_OUT_OPTION = typer.Option(None, "--out", help="Run folder (default: train.out_dir).")
RESUME_OPTION = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint.")
ALLOW_CHANGED_OPTION = typer.Option(
    [], "--allow-changed", help="With --resume: accept this changed config key (e.g. optim.lr; repeatable)."
)
TOKENIZER_MODEL_OPTION = typer.Option(..., "--model", help="Tokenizer folder (save_pretrained output).")


def _metrics_line(metrics: dict) -> str:
    """A trainer's final metrics on one line: floats to 4 significant digits."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


# ---------------------------------------------------------------------------------------- stage 0


@app.command("train-lm")
def train_lm_cmd(
    config: Path = typer.Option(..., "--config", help="Stage-0 YAML, e.g. configs/lm/tiny.yaml."),
    set_: list[str] = RUN_SET_OPTION,
    out: Path | None = RUN_OUT_OPTION,
    resume: bool = RESUME_OPTION,
    allow_changed: list[str] = ALLOW_CHANGED_OPTION,
) -> None:
    """Stage 0: train the tiny text tokenizer and LLaMA on the shapes world's text (embedded default)."""
    from unicode_mllm.config import load_config
    from unicode_mllm.stages.lm import LMTrainConfig, train_lm

    cfg = load_config(LMTrainConfig, config, set_)
    model_dir = train_lm(cfg, out_dir=out, resume=resume, allow_changed=allow_changed)
    typer.echo(f"language model saved to {model_dir} (load with AutoModelForCausalLM.from_pretrained)")


# ---------------------------------------------------------------------------------------- stage 1


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    config: Path = typer.Option(..., "--config", help="Stage-1 YAML, e.g. configs/tokenizer/tiny.yaml."),
    set_: list[str] = RUN_SET_OPTION,
    out: Path | None = RUN_OUT_OPTION,
    resume: bool = RESUME_OPTION,
    allow_changed: list[str] = ALLOW_CHANGED_OPTION,
) -> None:
    """Stage 1: train the visual tokenizer whose codebook is the LLM's embedding table."""
    from unicode_mllm.config import load_config
    from unicode_mllm.stages.tokenizer.config import TokenizerTrainConfig
    from unicode_mllm.stages.tokenizer.trainer import train_tokenizer

    cfg = load_config(TokenizerTrainConfig, config, set_)
    result = train_tokenizer(cfg, out_dir=out, resume=resume, allow_changed=allow_changed)
    typer.echo(f"tokenizer saved to {result.final_dir} after {result.steps} steps")
    typer.echo(_metrics_line(result.metrics))


@app.command("train-mllm")
def train_mllm_cmd(
    config: Path = typer.Option(..., "--config", help="Stage-2 YAML, e.g. configs/mllm/tiny.yaml."),
    set_: list[str] = RUN_SET_OPTION,
    out: Path | None = RUN_OUT_OPTION,
    resume: bool = RESUME_OPTION,
    allow_changed: list[str] = ALLOW_CHANGED_OPTION,
) -> None:
    """Stage 2: fine-tune the LLM to read and write images (VQA, captions, text-to-image, decompression)."""
    from unicode_mllm.config import load_config
    from unicode_mllm.stages.mllm import MLLMTrainConfig, train_mllm

    cfg = load_config(MLLMTrainConfig, config, set_)
    result = train_mllm(cfg, out_dir=out, resume=resume, allow_changed=allow_changed)
    typer.echo(f"model saved to {result.final_dir} after {result.steps} steps")
    typer.echo(_metrics_line(result.metrics))


@app.command("compare-codebook-modes")
def compare_codebook_modes_cmd(
    config: Path = typer.Option(..., "--config", help="Stage-1 YAML; its codebook.mode is replaced per run."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value (applies to every mode)."),
    out: Path = typer.Option(Path("runs/codebook_modes"), "--out", help="One sub-folder per mode."),
) -> None:
    """Stage-1 ablation: language_driven, frozen, dual and separate on the same data, steps and seed."""
    from unicode_mllm.config import load_config
    from unicode_mllm.stages.tokenizer.compare_modes import compare_codebook_modes, rows_to_markdown
    from unicode_mllm.stages.tokenizer.config import TokenizerTrainConfig

    cfg = load_config(TokenizerTrainConfig, config, set_)
    ensure_writable_output(out, "--out", folder=True)
    rows = compare_codebook_modes(cfg, out)
    table = rows_to_markdown(rows, cfg.data.eval_splits)
    (out / "comparison.md").write_text(table + "\n")
    typer.echo(table)


@app.command("reconstruct")
def reconstruct_cmd(
    images: list[Path] = typer.Argument(..., help="Image files to reconstruct."),
    model: Path = TOKENIZER_MODEL_OPTION,
    out: Path = typer.Option(Path("reconstructions"), "-o", "--out", help="Output folder for PNGs."),
    lpips_trunk: str = typer.Option("auto", "--lpips-trunk", help="VGG16 trunk for LPIPS: auto, a path, or none."),
    device: str = DEVICE_OPTION,
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
    model: Path = TOKENIZER_MODEL_OPTION,
    shards: Path = typer.Option(..., "--shards", help="Input shard folder with manifest.json."),
    out: Path = typer.Option(..., "--out", help="Output shard folder (images + visual_token_ids)."),
    split: list[str] = typer.Option([], "--split", help="Splits to encode (default: all)."),
    batch_size: int = typer.Option(64, "--batch-size"),
    device: str = DEVICE_OPTION,
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
