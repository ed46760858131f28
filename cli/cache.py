"""`lidit cache ...`: build and inspect the feature cache (dispatches to `pipelines/` and `lidit.cache`)."""

from __future__ import annotations

import argparse
import json

from cli.common import group_help


def _build(args: argparse.Namespace) -> int:
    from cli.common import CommandError
    from pipelines.build import run_from_args  # imported here: `lidit --help` must not import Ray
    from pipelines.commit import CommitConflictError

    try:
        return run_from_args(args)
    except CommitConflictError as exc:
        raise CommandError(str(exc), exc.hint) from exc


def _info(args: argparse.Namespace) -> int:
    from lidit.cache.reader import CacheReader

    # A missing cache raises CacheNotFoundError: cli.errors prints it as one line with what to do.
    info = CacheReader(args.uri, version=args.version).describe()
    if args.json:
        print(json.dumps(info))
        return 0
    print(
        f"cache {info['uri']} version {info['version']} (versions: {', '.join(map(str, info['versions']))})"
    )
    print(f"  {info['rows']} rows in {info['shards']} shards, {info['bytes_per_sample']:.0f} bytes/sample")
    print(f"  quarantined {info['quarantine_counts'] or 'none'}")
    for name, e in info["encoders"].items():
        print(
            f"  encoder {name}: {e['path']} layer {e['layer']}, max_length {e['max_length']}, "
            f"prefix {e['prefix_len']} tokens, hidden {e['hidden_size']}, stored {e['dtype']} "
            f"(computed {e['compute_dtype']}), fingerprint {e['fingerprint']}"
            + (", with layout targets" if e["layout_targets"] else "")
            + (", with negative captions" if e["negative_captions"] else "")
        )
        print(
            f"    instruction: {e['instruction']!r}"
            + (f", system prompt: {e['system_prompt']!r}" if e["system_prompt"] else "")
        )
    v = info["vae"]
    shapes = ", ".join(f"{b} -> {'x'.join(map(str, s))}" for b, s in v["latent_shapes"].items())
    print(
        f"  vae {v['path']} ({v['fingerprint']}): stored {v['dtype']}, latents (C, H, W) per bucket: {shapes}"
    )
    print(f"  buckets (resolution {info['resolution']}): {', '.join(info['buckets'])}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `cache` command group."""
    from pipelines.args import add_build_arguments

    cache = sub.add_parser("cache", help="build / inspect the feature cache (Ray tasks + actors)")
    csub = cache.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    build = csub.add_parser(
        "build",
        help="build or incrementally update a cache",
        description="Sources -> VAE latents + LLM states per encoder -> Parquet cache (resumable, incremental).",
    )
    add_build_arguments(build)
    build.set_defaults(handler=_build)
    info = csub.add_parser("info", help="describe a committed cache version")
    info.add_argument("uri", help="cache root (local path or s3://)")
    info.add_argument("--version", type=int, default=None, help="version (default latest)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=_info)
    cache.set_defaults(handler=lambda _args: group_help(cache))
