"""Training curves from a JSONL log: one PNG with a panel per metric group."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_curves(
    rows: Sequence[dict],
    panels: dict[str, Sequence[str]],
    out_path: str | Path,
    x_key: str = "step",
    log_scale: Sequence[str] = (),
) -> Path:
    """`panels` maps a panel title to the metric keys drawn in it (a key may hold a list: one line each)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels.items(), strict=True):
        for key in keys:
            points = [(r[x_key], r[key]) for r in rows if key in r and r[key] is not None]
            if not points:
                continue
            xs = [p[0] for p in points]
            values = [p[1] for p in points]
            if isinstance(values[0], list):
                for k in range(len(values[0])):
                    ax.plot(xs, [v[k] for v in values], label=f"{key}[{k}]")
            else:
                ax.plot(xs, values, label=key)
        ax.set_title(title)
        ax.set_xlabel(x_key)
        if title in log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
