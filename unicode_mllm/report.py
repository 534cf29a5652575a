"""A self-contained HTML report: sections of text, tables and images, plus a metrics JSON beside it."""

from __future__ import annotations

import html
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unicode_mllm.runtime.checkpoint import atomic_write_json, atomic_write_text


@dataclass
class Section:
    title: str
    text: str = ""
    table: list[list[Any]] = field(default_factory=list)  # first row is the header
    images: list[tuple[Path, str]] = field(default_factory=list)  # (file, caption)


def write_report(out_dir: str | Path, title: str, sections: list[Section], metrics: dict[str, Any]) -> Path:
    """Write `out_dir/index.html` (images copied next to it) and `out_dir/metrics.json`; return the page."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    body = [f"<h1>{html.escape(title)}</h1>"]
    targets: dict[Path, str] = {}  # source file -> its name under images/
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            body.append(f"<p>{html.escape(section.text)}</p>")
        if section.table:
            header, *rows = section.table
            body.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
            for row in rows:
                body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
            body.append("</table>")
        for path, caption in section.images:
            target = out_dir / "images" / _image_name(Path(path), targets)
            if Path(path).resolve() != target.resolve():
                shutil.copyfile(path, target)
            body.append(
                f'<figure><img src="images/{html.escape(target.name)}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        "img{max-width:100%;image-rendering:pixelated}"
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
    page += f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    atomic_write_json(out_dir / "metrics.json", metrics)
    return atomic_write_text(out_dir / "index.html", page)


def _image_name(path: Path, taken: dict[Path, str]) -> str:
    """The file's own name under images/, or `stem-N.suffix` when another file of this report took it
    (every trainer writes a `curves.png`)."""
    source = path.resolve()
    if source not in taken:
        used = set(taken.values())
        name, n = path.name, 2
        while name in used:
            name, n = f"{path.stem}-{n}{path.suffix}", n + 1
        taken[source] = name
    return taken[source]
