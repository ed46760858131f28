"""Print pip constraints that pin every dependency of pyproject.toml to its lowest allowed version.

    python tools/lowest_constraints.py [--extra dev] > /tmp/lowest.txt
    python -m venv /tmp/lowest && /tmp/lowest/bin/pip install -c /tmp/lowest.txt -e ".[dev]"
    /tmp/lowest/bin/python -m pytest -q tests/lidit/test_encoder.py tests/lidit/cache tests/pipelines/test_build.py

The lowest-versions check of issue 17: the encoder and cache tests on the oldest releases the ranges allow.
Only `>=` lower bounds are pinned; transitive dependencies resolve freely.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def lowest_pins(requirements: list[str]) -> list[str]:
    """`name[extras]>=X,<Y` -> `name==X` for each requirement with a lower bound."""
    pins = []
    for req in requirements:
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$", req)
        if not match:
            continue
        name, spec = match.group(1), match.group(3)
        lower = re.search(r">=\s*([0-9][^,;\s]*)", spec)
        if lower:
            pins.append(f"{name}=={lower.group(1)}")
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--extra", action="append", default=["dev"], help="optional-dependency groups to include"
    )
    args = parser.parse_args()
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in args.extra:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    print("\n".join(lowest_pins(reqs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
