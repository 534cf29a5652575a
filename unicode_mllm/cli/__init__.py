"""The `unicode-mllm` command line: parses options, builds configs and calls library functions.

Errors print one line (`error: ...`) and exit non-zero; `--debug` shows the traceback instead. Environment
problems (a full disk, a read-only output, a refused pickle) are user errors too: unicode_mllm/environment_errors.py.
Heavy imports happen inside each command so `--help` stays fast.

The commands live by subject: `stages` (train-lm, train-tokenizer, train-mllm, compare-codebook-modes,
reconstruct, tokenize, demo), `inference` (ask, generate, chat, serve), `data` (the `data` group) and
`evaluation` (the `eval` group). `options` declares what commands of several modules share; `checks` holds the
checks that run before any work.
"""

from __future__ import annotations

import sys

import typer

# The command modules add their commands to `app` as they are imported, in this order (the order of --help).
from unicode_mllm.cli import stages  # noqa: F401  # isort: skip
from unicode_mllm.cli import inference  # noqa: F401  # isort: skip
from unicode_mllm.cli.app import app
from unicode_mllm.cli.data import data_app
from unicode_mllm.cli.evaluation import eval_app
from unicode_mllm.environment_errors import environment_message
from unicode_mllm.errors import UserError

app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")


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
