"""`lidit starter ...`: build (or reuse) the offline starter assets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.common import group_help


def _default_out() -> Path:
    from lidit.config import lidit_home

    return lidit_home() / "starter"


def _build(args: argparse.Namespace) -> int:
    # Imported here so `lidit --help` does not pay for the starter's imports.
    from lidit.starter import build_starter

    out = Path(args.out) if args.out else _default_out()
    assets = build_starter(out, preset=args.preset, overrides=args.set, progress=not args.quiet)
    summary = assets.summary
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    q = summary["quality"]
    ev = q["evaluator"]
    print(f"starter set: {assets.root}")
    print(
        f"  time       {summary['build_seconds']:.1f}s"
        + (f" (reused: {', '.join(summary['reused'])})" if summary["reused"] else "")
    )
    data = summary["stages"]["data"]["metrics"]
    print(
        f"  images     {data['train']['rows']} train, {data['heldout']['rows']} held-out (64x64 PNG, Parquet + folders)"
    )
    print(
        f"  LM ppl     llama {q['lm_llama_heldout_perplexity']:.2f}, qwen2 {q['lm_qwen2_heldout_perplexity']:.2f} (held-out captions)"
    )
    print(f"  VAE PSNR   {q['vae_heldout_psnr_db']:.2f} dB (held-out images)")
    print("  evaluator  " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `starter` command group."""
    parser = subparsers.add_parser(
        "starter",
        help="build the offline starter assets (data, tokenizer, tiny LMs, tiny VAE)",
        description="Offline starter assets: a compositional shapes set, a tokenizer, two tiny LMs and a tiny VAE.",
    )
    parser.set_defaults(handler=lambda _args: group_help(parser))
    sub = parser.add_subparsers(dest="starter_command", metavar="COMMAND")
    build = sub.add_parser(
        "build",
        help="build or reuse (verified by fingerprint) the starter assets",
        description="Build the starter assets; a second call verifies fingerprints and reuses what is there.",
    )
    build.add_argument("--out", default=None, help="output directory (default: $LIDIT_HOME/starter)")
    build.add_argument("--preset", default="default", choices=["default", "micro"], help="size preset")
    build.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. vae.steps=100"
    )
    build.add_argument("--json", action="store_true", help="print the summary as JSON")
    build.add_argument("--quiet", action="store_true", help="no progress on stderr")
    build.set_defaults(handler=_build)
