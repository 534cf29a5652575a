"""Run the kit's sections (plan.py) and write DIR/gpu_suite.json and DIR/gpu_suite.md after each one.

On a GPU every section runs in its own process (`--isolation process`): a CUDA error or an out-of-memory state
cannot leak into the next, and a section past its time cap is killed (its process group) with what it recorded
kept. With `--cpu-smoke` the sections run in this process by default (`--isolation inline`), which saves a
torch import per section on a small CPU. Either way an error in one section is recorded with its one-line
message and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from gpu_kit.context import SectionContext, one_line, read_record
from gpu_kit.plan import DEFAULT_BUDGET_MINUTES, MIN_SECTION_SECONDS, SECTION_NAMES, get_plan

SUITE_SCRIPT = Path(__file__).resolve().parents[1] / "gpu_suite.py"
SMOKE_CAP_S = 600.0  # a section's cap with --cpu-smoke --isolation process (the CPU is slow and shared)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/gpu_suite.py",
        description="The GPU kit: every section's figures into DIR/gpu_suite.json and DIR/gpu_suite.md.",
    )
    parser.add_argument("--out", type=Path, help="output folder (created)")
    parser.add_argument("--cpu-smoke", action="store_true", help="every section at toy size on the CPU")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SECTION_NAMES)}")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=DEFAULT_BUDGET_MINUTES,
        help=f"wall-clock budget of the whole kit on the GPU (default {DEFAULT_BUDGET_MINUTES})",
    )
    parser.add_argument(
        "--isolation",
        choices=("auto", "process", "inline"),
        default="auto",
        help="one process per section, or all in this one (auto: process on the GPU, inline with --cpu-smoke)",
    )
    # The child side of --isolation process.
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--section-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seconds-left", type=float, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.section is not None:
        return run_child(args)
    if args.out is None:
        parser.error("--out DIR is required")
    try:
        names = select_sections(args.only)
    except KeyError as error:
        parser.error(str(error.args[0]))
    return run_suite(args, names, argv)


def select_sections(only: str | None) -> list[str]:
    if only is None:
        return list(SECTION_NAMES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    for name in names:
        get_plan(name)  # KeyError naming the choices
    return [n for n in SECTION_NAMES if n in names]  # the plan's order


def mode_of(args: argparse.Namespace) -> str:
    return "cpu-smoke" if args.cpu_smoke else "gpu"


# ----- one section ------------------------------------------------------------------------------------


def run_section(name: str, mode: str, section_dir: Path, seconds_left: float) -> int:
    """Run section `name` in this process; its record goes to section_dir/section.json. Returns 0 or 1."""
    import torch

    device = torch.device("cpu" if mode == "cpu-smoke" else "cuda")
    ctx = SectionContext(
        name=name,
        mode=mode,
        settings=get_plan(name).settings(mode),
        out_dir=section_dir,
        device=device,
        deadline=time.monotonic() + seconds_left,
    )
    module = importlib.import_module(f"gpu_kit.sections.{name}")
    ctx.record.update(title=module.TITLE, how=module.HOW)
    try:
        module.run(ctx)
    except Exception as error:  # recorded with its one-line message; the kit goes on with the next section
        traceback.print_exc()
        ctx.finish("error", one_line(error))
        return 1
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ctx.finish("ok")
    return 0


def run_child(args: argparse.Namespace) -> int:
    return run_section(args.section, mode_of(args), args.section_dir, args.seconds_left)


def run_isolated(name: str, mode: str, section_dir: Path, timeout: float) -> dict[str, Any]:
    """The section in a child process (its own session, killed as a group past `timeout`)."""
    section_dir.mkdir(parents=True, exist_ok=True)
    log_path = section_dir / "section.log"
    cmd = [sys.executable, str(SUITE_SCRIPT), "--section", name, "--section-dir", str(section_dir)]
    cmd += ["--seconds-left", f"{max(1.0, timeout - 10):.0f}"]  # ~10 s for the child's start and exit
    if mode == "cpu-smoke":
        cmd.append("--cpu-smoke")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group: it and what it started
            proc.wait()
            timed_out = True
    record = read_record(section_dir) or {"name": name, "figures": [], "notes": []}
    record["log"] = str(log_path)
    if timed_out:
        record["status"] = "timeout"
        record["error"] = f"killed at the section's time cap of {timeout:.0f} s (figures recorded before are kept)"
    elif record.get("status") not in ("ok", "error"):
        record["status"] = "error"
        record["error"] = f"the section's process exited with {proc.returncode}: {last_line(log_path)}"
    return record


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run_inline(name: str, mode: str, section_dir: Path, seconds_left: float) -> dict[str, Any]:
    run_section(name, mode, section_dir, seconds_left)
    return read_record(section_dir) or {"name": name, "status": "error", "error": "no record written"}


# ----- the suite ---------------------------------------------------------------------------------------


def run_suite(args: argparse.Namespace, names: list[str], argv: list[str] | None) -> int:
    import torch

    from gpu_kit.chips import describe_device, software_versions
    from gpu_kit.report import markdown

    mode = mode_of(args)
    if mode == "gpu" and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here (torch.cuda.is_available() is False); use --cpu-smoke", file=sys.stderr)
        return 2
    isolation = args.isolation if args.isolation != "auto" else ("inline" if mode == "cpu-smoke" else "process")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + 60 * args.budget_minutes
    command = " ".join(["python benchmarks/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)])
    suite: dict[str, Any] = {
        "kit": "benchmarks/gpu_suite.py",
        "command": command,
        "mode": mode,
        "isolation": isolation,
        "budget_minutes": args.budget_minutes,
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": describe_device(torch.device("cuda" if mode == "gpu" else "cpu")),
        "software": software_versions(),
        "sections": [],
    }

    def write() -> None:
        suite["seconds"] = round(time.monotonic() - started, 1)
        statuses = [s["status"] for s in suite["sections"]]
        suite["summary"] = {status: statuses.count(status) for status in dict.fromkeys(statuses)}
        (out / "gpu_suite.json").write_text(json.dumps(suite, indent=2, default=str) + "\n")
        (out / "gpu_suite.md").write_text(markdown(suite))

    for name in names:
        plan = get_plan(name)
        left = deadline - time.monotonic()
        section_dir = out / "sections" / name
        t0 = time.monotonic()
        if mode == "gpu" and left < MIN_SECTION_SECONDS:
            record = {"name": name, "status": "not run", "error": f"the kit's budget is spent ({left:.0f} s left)"}
        else:
            cap = plan.cap_s if mode == "gpu" else SMOKE_CAP_S
            timeout = min(cap, left) if mode == "gpu" else cap
            print(f"gpu_suite: {name} (up to {timeout:.0f} s)", file=sys.stderr, flush=True)
            if isolation == "process":
                record = run_isolated(name, mode, section_dir, timeout)
            else:
                record = run_inline(name, mode, section_dir, timeout)
        record["seconds"] = round(time.monotonic() - t0, 1)
        suite["sections"].append(record)
        write()
        print(f"gpu_suite: {name} {record['status']} in {record['seconds']} s", file=sys.stderr, flush=True)
    write()
    print(f"gpu_suite: wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}", file=sys.stderr)
    return 0 if all(s["status"] == "ok" for s in suite["sections"]) else 1
