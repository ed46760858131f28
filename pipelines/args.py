"""Command-line arguments of a cache build, shared by `lidit cache build` and `python -m pipelines.build`.

Kept free of heavy imports so `lidit --help` stays fast.
"""

from __future__ import annotations

import argparse


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    """Add CONFIG, --source, --source-format, --output, --set and --json to `p`."""
    p.add_argument("config", help="CacheBuildConfig YAML (e.g. configs/starter/cache.yaml)")
    p.add_argument(
        "--source",
        action="append",
        metavar="URI",
        help="replace the sources: Parquet, WebDataset .tar (file or folder) or image folder (repeatable), with "
        "default column names and no grounding_column (list sources in the YAML for those)",
    )
    p.add_argument(
        "--source-format",
        choices=["auto", "parquet", "webdataset", "images"],
        default="auto",
        help="format of the --source URIs (auto: by suffix, .parquet / .tar files or folders of them, else image folders)",
    )
    p.add_argument("--output", metavar="URI", help="cache root (local path or s3://bucket/prefix)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
