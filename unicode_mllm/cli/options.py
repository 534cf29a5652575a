"""What commands of several modules share: their options, declared once (typer copies an option object for each
command that uses it, so one declaration serves them all), and the reading of them."""

from __future__ import annotations

import typer

from unicode_mllm.errors import UserError

REDUCE_HELP = (
    "Token reduction of text answers, key=value on top of the model's saved setting (repeatable), e.g. "
    "vision=mustdrop_merge, llm=ficoco_l, ficoco_l.layers=[1], vision=none."
)
DEPTH_TEMPERATURES_HELP = (
    "One sampling temperature per code depth of a position, comma-separated, replacing --temperature "
    "(e.g. 1,0.5,0.5,0.5,0.5 for hq: top code at 1, bottom codes at 0.5)."
)

DEVICE_OPTION = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps.")
REDUCE_OPTION = typer.Option([], "--reduce", help=REDUCE_HELP)
DEPTH_TEMPERATURES_OPTION = typer.Option(None, "--depth-temperatures", help=DEPTH_TEMPERATURES_HELP)


def parse_depth_temperatures(text: str | None) -> tuple[float, ...] | None:
    """'1,0.5,0.5' -> (1.0, 0.5, 0.5); None stays None. Raises UserError for anything else."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UserError(
            f"--depth-temperatures {text!r} is not a comma-separated list of numbers; write e.g. 1,0.5,0.5,0.5,0.5"
        ) from None
