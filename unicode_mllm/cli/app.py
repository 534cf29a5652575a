"""The root `unicode-mllm` typer app and its global options; the command modules add their commands to it."""

from __future__ import annotations

import typer

from unicode_mllm.errors import UserError

app = typer.Typer(
    name="unicode-mllm",
    help="UniCode: a unified visual-text codebook tokenizer and generative multimodal LLM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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
