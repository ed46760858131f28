"""`lidit --help` latency: wall time of every help page as a fresh process, against the bare interpreter.

    python benchmarks/cli_help.py [--repeat 3] [--out benchmarks/results]

Each page is `python -m cli.main ... --help` in a new process (what a user types), median of `--repeat` runs;
the baseline is `python -c pass` measured the same way, so a busy box (load average recorded) shows as a higher
baseline, not as a slower parser. Goal (issue 17): every page < 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cli.main import build_parser

GOAL_S = 1.0


def help_commands() -> list[list[str]]:
    """Every command path of the parser tree: [], ["cache"], ["cache", "build"], ..."""
    out: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        out.append(path)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, [*path, name])

    walk(build_parser(), [])
    return out


def wall(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per page (median)")
    parser.add_argument("--out", default="benchmarks/results", help="results folder")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    baseline = wall([sys.executable, "-c", "pass"], args.repeat)
    rows = []
    for path in help_commands():
        seconds = wall([sys.executable, "-m", "cli.main", *path, "--help"], args.repeat)
        rows.append({"command": " ".join(["lidit", *path, "--help"]), "seconds": round(seconds, 3)})
    t0 = time.perf_counter()
    build_parser()
    in_process = time.perf_counter() - t0
    worst = max(r["seconds"] for r in rows)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "repeat": args.repeat,
        "interpreter_start_s": round(baseline, 3),
        "parser_build_in_process_s": round(in_process, 4),
        "pages": rows,
        "worst_s": round(worst, 3),
        "worst_over_interpreter_s": round(worst - baseline, 3),
        "goal_s": GOAL_S,
        "met": worst < GOAL_S,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli_help.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# `lidit --help` latency",
        "",
        f"Command: `python benchmarks/cli_help.py --repeat {args.repeat}`; {os.cpu_count()} CPUs, load average "
        f"{result['load_average'][0]} -> {result['load_average'][1]} (other jobs on the box).",
        "",
        f"- bare interpreter (`python -c pass`): {baseline:.2f} s",
        f"- building the whole parser tree in process: {in_process * 1000:.1f} ms",
        f"- slowest page: {worst:.2f} s ({worst - baseline:+.2f} s over the bare interpreter); goal < {GOAL_S} s: "
        f"{'met' if result['met'] else 'missed'}",
        "- before (issue 17): `lidit --help` 4.5-5.4 s, each subcommand 3.3-3.7 s (torch and diffusers imported at "
        "parser build)",
        "",
        "| command | wall s (median) |",
        "|---|---|",
        *[f"| `{r['command']}` | {r['seconds']:.2f} |" for r in rows],
        "",
    ]
    (out / "cli_help.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
