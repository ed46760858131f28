"""`lidit model ...`: inspect generator presets."""

from __future__ import annotations

import argparse
import json

from cli.common import group_help


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="inspect model presets")
    msub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    lst = msub.add_parser("list", help="list presets with parameter counts (computed on the meta device)")
    lst.add_argument("--llm-width", type=int, default=4096, help="hidden size of each LLM")
    lst.add_argument("--json", action="store_true", help="print one JSON object")
    lst.set_defaults(handler=list_presets)
    model.set_defaults(handler=lambda _args: group_help(model))


def preset_rows(llm_width: int) -> list[dict]:
    from lidit.generator import (
        GeneratorConfig,
        TextBranchSpec,
        count_parameters,
    )  # torch: not at parser build
    from lidit.presets import PRESETS

    rows = []
    for name, p in PRESETS.items():
        row = {"preset": name, "depth": p.depth, "width": p.dim, "heads": p.heads, "patch": p.patch_size}
        for k in (1, 2):
            branches = [TextBranchSpec(name=f"llm{i}", hidden_size=llm_width) for i in range(k)]
            row[f"params_{k}_llm"] = count_parameters(GeneratorConfig.from_preset(name, branches))
        rows.append(row)
    return rows


def list_presets(args: argparse.Namespace) -> int:
    rows = preset_rows(args.llm_width)
    if args.json:
        print(json.dumps({"llm_width": args.llm_width, "presets": rows}))
        return 0
    print(
        f"{'preset':<12}{'depth':>6}{'width':>7}{'heads':>6}{'1 LLM':>12}{'2 LLMs':>12}   (LLM width {args.llm_width})"
    )
    for r in rows:
        print(
            f"{r['preset']:<12}{r['depth']:>6}{r['width']:>7}{r['heads']:>6}"
            f"{r['params_1_llm'] / 1e6:>11.1f}M{r['params_2_llm'] / 1e6:>11.1f}M"
        )
    return 0
