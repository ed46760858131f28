"""Small helpers shared by the command-group modules."""

from __future__ import annotations

import argparse


def group_help(parser: argparse.ArgumentParser) -> int:
    """Handler of a bare command group (`lidit starter`): print its help, exit code 2."""
    parser.print_help()
    return 2
