"""Entry point of the `lidit` console script."""

from __future__ import annotations

import argparse
import importlib
import sys

from lidit.config import ConfigError

# Each module registers one command group with `register(subparsers)`; its handler returns an exit code.
COMMAND_MODULES = [
    "cli.model",
    "cli.starter",
    "cli.eval",
    "cli.cache",
    "cli.train",
    "cli.serve",
    "cli.quickstart",
    "cli.experiment",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lidit",
        description="LI-DiT platform: feature cache (Ray Data), training (Ray Train + FSDP2), serving (Ray Serve).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command group not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"lidit: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lidit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
