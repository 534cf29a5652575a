"""gpu_suite.md: the JSON's header, then per section its status, time, figures (value, unit, settings) and method."""

from __future__ import annotations

import json
from typing import Any


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _settings(settings: dict[str, Any] | None) -> str:
    if not settings:
        return ""
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in settings.items())


def markdown(suite: dict[str, Any]) -> str:
    device, software = suite["device"], suite["software"]
    spec = device.get("spec")
    lines = [
        f"# GPU kit ({suite['mode']})",
        "",
        f"- Command: `{suite['command']}`",
        f"- Device: {device['name']} ({device['type']})"
        + (
            f"; datasheet: {spec['label']}, {spec['bf16_dense_tflops']} TFLOPS dense bf16, {spec['hbm_tb_per_s']} TB/s"
            if spec
            else ""
        ),
        "- Software: " + ", ".join(f"{k} {v}" for k, v in software.items()),
        f"- Started (UTC) {suite['started_utc']}; wall time {suite.get('seconds', 0):.1f} s of a "
        f"{suite['budget_minutes']}-minute budget; sections isolated: {suite['isolation']}",
        f"- Sections: {suite.get('summary', {})}",
        "",
    ]
    for section in suite["sections"]:
        lines += [f"## {section['name']}: {section.get('title', '')}", ""]
        status = section["status"]
        lines.append(
            f"Status **{status}** in {section.get('seconds', 0):.1f} s"
            + (f": `{section['error']}`" if section.get("error") else ".")
        )
        lines += ["", f"Settings: `{json.dumps(section.get('settings', {}), default=str)}`", ""]
        figures = section.get("figures", [])
        if figures:
            lines += ["| figure | value | unit | measured at |", "|---|---|---|---|"]
            lines += [
                f"| {f['name']} | {_value(f['value'])} | {f['unit']} | {_settings(f.get('settings'))} |"
                for f in figures
            ]
            lines.append("")
        lines += [f"- {note}" for note in section.get("notes", [])]
        if section.get("how"):
            lines += ["", f"How: {section['how']}"]
        if section.get("log"):
            lines += ["", f"Log: `{section['log']}`"]
        lines.append("")
    return "\n".join(lines)
