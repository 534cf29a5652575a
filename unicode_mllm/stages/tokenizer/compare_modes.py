"""The codebook-learning ablation of stage 1: the same data, steps and seed for every mode.

`language_driven` (blend schedule from the config), `frozen` (codebook = C_L, never updated), `dual`
(free EMA from C_L; the LLM's table is overwritten by it in stage 2) and `separate` (an own codebook of
new vocabulary). Reports held-out PSNR, usage per depth and the distance to C_L.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from unicode_mllm.stages.tokenizer.config import TokenizerTrainConfig
from unicode_mllm.stages.tokenizer.trainer import train_tokenizer

MODES = ("language_driven", "frozen", "dual", "separate")


def mode_config(cfg: TokenizerTrainConfig, mode: str) -> TokenizerTrainConfig:
    """`cfg` with `codebook.mode = mode` and the blend schedule the mode requires."""
    blend = cfg.codebook.blend
    if mode != "language_driven":
        blend = dataclasses.replace(blend, schedule="none")
    codebook = dataclasses.replace(cfg.codebook, mode=mode, blend=blend)
    new = dataclasses.replace(cfg, codebook=codebook)
    new.validate()
    return new


def compare_codebook_modes(
    cfg: TokenizerTrainConfig, out_dir: str | Path, modes: tuple[str, ...] = MODES
) -> list[dict[str, Any]]:
    """Train one tokenizer per mode into `out_dir/{mode}`; return one row of final metrics per mode."""
    rows = []
    for mode in modes:
        result = train_tokenizer(mode_config(cfg, mode), out_dir=Path(out_dir) / mode)
        rows.append({"mode": mode, **result.metrics})
    return rows


def rows_to_markdown(rows: list[dict[str, Any]], splits: tuple[str, ...]) -> str:
    header = ["mode", "steps", *[f"PSNR {s} (dB)" for s in splits], "unique codes per depth", "||C-C_L||/||C_L||"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        dist = r.get("rel_distance")
        cells = [
            r["mode"],
            str(r["step"]),
            *[f"{r.get(f'psnr_{s}', float('nan')):.2f}" for s in splits],
            str(r.get("usage")),
            "n/a (own codebook)" if dist is None else f"{dist:.3g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
