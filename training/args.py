"""Command-line arguments of a training run, shared by `lidit train` and `python -m training.train`.

Kept free of heavy imports (no torch, no Ray) so `lidit --help` stays fast.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add CONFIG, --steps, --workers, --set and --json to `parser`."""
    parser.add_argument("config", nargs="?", help="training YAML (default: built-in defaults)")
    parser.add_argument("--steps", type=int, help="total optimizer steps (default: the config's `steps`)")
    parser.add_argument(
        "--workers", type=int, help="Ray Train workers (default: the config's `scale.workers`)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. model.flow_shift=3 (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
