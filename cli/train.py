"""`lidit train CONFIG.yaml ...`: Ray Train V2 + FSDP2 training on the feature cache."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from training.args import add_arguments  # light: no torch/Ray while building the parser

    parser = sub.add_parser("train", help="train refiners + LI-DiT on a feature cache (Ray Train, FSDP2)")
    add_arguments(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from training.train import run_from_args

    return run_from_args(args)
