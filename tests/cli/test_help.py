"""`lidit --help` stays fast: building every parser imports no heavy library; every flag explains itself."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from cli.main import build_parser

HEAVY = ("torch", "diffusers", "transformers", "ray", "mlflow", "pyarrow", "pydantic")

# Runs in a fresh interpreter: builds the whole parser tree, renders every help page, reports what got imported.
_PROBE = """
import argparse, json, sys
from cli.main import build_parser

def walk(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from walk(child)

pages = [p.format_help() for p in walk(build_parser())]
print(json.dumps({"pages": len(pages), "modules": sorted(sys.modules)}))
"""


def _walk(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _walk(child)


def test_building_every_help_page_imports_no_heavy_library() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["pages"] >= 14  # lidit + every group and subcommand
    loaded = {m.split(".")[0] for m in report["modules"]}
    assert not loaded & set(HEAVY), f"parser build imported {sorted(loaded & set(HEAVY))}"


def test_every_flag_has_help_and_defaults_are_shown() -> None:
    missing, unshown = [], []
    for parser in _walk(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                missing.append(name)
            shown = action.default not in (None, False, argparse.SUPPRESS) and action.default != []
            if shown and str(action.default) not in parser.format_help():
                unshown.append(name)
    assert not missing, f"flags without help: {missing}"
    assert not unshown, f"defaults not shown: {unshown}"


def test_version_and_subcommand_help_through_the_module_entry() -> None:
    version = subprocess.run(
        [sys.executable, "-m", "cli.main", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("lidit ") and version.stdout.split()[1][0].isdigit()
    train = subprocess.run(
        [sys.executable, "-m", "cli.main", "train", "--help"], capture_output=True, text=True, check=True
    )
    assert "--set KEY=VALUE" in train.stdout and "repeatable" in train.stdout
    gen = subprocess.run(
        [sys.executable, "-m", "cli.main", "generate", "--help"], capture_output=True, text=True, check=True
    )
    assert "(default: generated)" in gen.stdout and "(default: 1)" in gen.stdout


def test_serve_flags_match_the_serving_module_entry() -> None:
    """cli/serve.py mirrors serving.run.add_arguments (kept light); the two must not drift apart."""
    from cli.serve import add_serve_arguments
    from serving.run import add_arguments

    def flags(add) -> dict[str, tuple]:
        p = argparse.ArgumentParser()
        add(p)
        return {a.dest: (tuple(a.option_strings), a.type, a.default) for a in p._actions if a.dest != "help"}

    assert flags(add_serve_arguments) == flags(add_arguments)
