"""Entry point of the `lidit` console script.

Building the parser imports only argparse and the `cli` modules: every heavy import (torch, Ray, MLflow, the
stages) happens inside a command's handler, so `lidit --help` and every `--help` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cli.common import Parser

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
DISTRIBUTION = "lidit-platform"


def version() -> str:
    """The installed distribution's version (the source tree's pyproject when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


class _VersionAction(argparse.Action):
    """`--version`: reads the installed version only when asked (importlib.metadata costs ~0.2 s per start)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(
            option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version and exit"
        )

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lidit",
        description="LI-DiT platform: feature cache (Ray), training (Ray Train + FSDP2), serving (Ray Serve).",
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray, Serve, MLflow and library output on the console (else: $LIDIT_HOME/logs/COMMAND.log)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0 if args.command is None else 2
    words = [v for k, v in vars(args).items() if k.endswith("_command") and v]
    if args.command == "serve" and args.config == "reload":  # `reload` is serve's positional, not a subparser
        words.append("reload")
    command = " ".join(["lidit", args.command, *words])
    from cli.console import configure, tool_console, unconfigure

    verbose = args.verbose or os.environ.get("LIDIT_VERBOSE", "") not in ("", "0")
    if verbose:
        os.environ["LIDIT_VERBOSE"] = "1"  # cluster.ensure_ray and child processes read it
    log_file = configure(command, verbose=verbose)
    try:
        with tool_console(log_file):
            return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from cli.errors import operational_error

        config_error = sys.modules.get("lidit.config")
        if config_error is not None and isinstance(exc, config_error.ConfigError):
            print(f"{command}: config error: {exc}", file=sys.stderr)
            return 2
        failure = operational_error(exc)
        if failure is None:
            raise  # a bug: keep the traceback
        print(f"{command}: {failure}", file=sys.stderr)
        return failure.exit_code
    finally:
        unconfigure()


if __name__ == "__main__":
    sys.exit(main())
