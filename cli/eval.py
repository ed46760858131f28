"""`lidit eval ...`: the built-in compositional benchmark (coloured shapes, GenEval-style)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cli.common import group_help


def _shapes(args: argparse.Namespace) -> int:
    # Imported here so `lidit --help` does not pay for the evaluator's imports.
    from lidit.starter import format_report, load_starter, score_folder, score_split

    t0 = time.perf_counter()
    if args.images:
        folder = Path(args.images)
        if not folder.is_dir():
            print(f"lidit eval shapes: {folder} is not a folder", file=sys.stderr)
            return 2
        try:
            report = score_folder(folder)
        except (FileNotFoundError, ValueError) as exc:
            print(f"lidit eval shapes: {exc}", file=sys.stderr)
            return 2
        source = {"images": str(folder.resolve())}
        title = f"images in {folder}"
    else:
        if args.starter:
            root = Path(args.starter)
        else:
            from lidit.config import lidit_home

            root = lidit_home() / "starter"
        try:
            assets = load_starter(root)
        except FileNotFoundError as exc:
            print(f"lidit eval shapes: {exc}", file=sys.stderr)
            return 2
        report = score_split(assets, args.split, limit=args.limit)
        source = {"starter": str(assets.root), "split": args.split}
        title = f"starter {args.split} images"
    seconds = time.perf_counter() - t0
    print(f"[eval] scored {report.n_images} images in {seconds:.1f}s", file=sys.stderr)
    if args.json:
        print(
            json.dumps({**source, "seconds": round(seconds, 2), **report.to_dict()}, indent=2, sort_keys=True)
        )
    else:
        print(format_report(report, title))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` command group."""
    parser = subparsers.add_parser(
        "eval",
        help="benchmarks: score images against prompt specs",
        description="Benchmarks that score images against their prompts.",
    )
    parser.set_defaults(handler=lambda _args: group_help(parser))
    sub = parser.add_subparsers(dest="eval_command", metavar="BENCHMARK")
    shapes = sub.add_parser(
        "shapes",
        help="compositional shapes benchmark (colour, shape, count, position, attribute binding)",
        description=(
            "Score images of coloured shapes against their prompt specs: per category, overall, per scene kind and "
            "by the relative position of each object in the prompt. Either a split of the starter set itself "
            "(--split) or a folder of generated images (--images DIR holding the images and specs.jsonl, one "
            '{"file": "000000.png", "prompt": "...", "spec": {...}} per line).'
        ),
    )
    what = shapes.add_mutually_exclusive_group()
    what.add_argument(
        "--split", choices=["heldout", "train"], default="heldout", help="starter split to score"
    )
    what.add_argument("--images", default=None, metavar="DIR", help="folder of images + specs.jsonl to score")
    shapes.add_argument(
        "--starter", default=None, metavar="DIR", help="starter directory (default: $LIDIT_HOME/starter)"
    )
    shapes.add_argument("--limit", type=int, default=None, help="score at most this many images of the split")
    shapes.add_argument("--json", action="store_true", help="print the report as JSON")
    shapes.set_defaults(handler=_shapes)
