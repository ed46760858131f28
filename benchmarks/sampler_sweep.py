"""Sampler sweep: how much of a trained generator's score is the sampler's?

    python benchmarks/sampler_sweep.py --generator RUN/step_10000 --config configs/starter/train_long.yaml \\
        --label long@10000 --steps 20,40 --guidance 2,4,7 [--sampler euler,heun] [--shift 1.5,3]

Scores one saved generator (`benchmarks/learning_curve.py --save DIR` writes `DIR/step_N`, or any
`LiDiTGenerator.save_pretrained` folder) on the held-out prompts with every combination of sampler, sampler
steps, guidance scale and sampling flow shift (default: the config's training shift), through the same
`LiDiTPipeline` and evaluator as the learning curve; rows merge into `benchmarks/results/sampler_sweep.{md,json}`
by label. Training is untouched: only sampling changes between rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from learning_curve import (  # same directory
    CATEGORIES,
    DIRECTIONS,
    RESULTS,
    category_scores,
    fmt,
    sampling_parts,
)

from lidit.cache.reader import CacheReader
from lidit.config import lidit_home, load_config
from lidit.experiment import EvalSection, evaluate_pipeline
from lidit.generator import LiDiTGenerator
from lidit.pipeline import LiDiTPipeline
from lidit.starter import heldout_prompts
from training.config import TrainConfig


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def sweep(
    generator: LiDiTGenerator,
    cfg: TrainConfig,
    prompts: list[tuple[str, dict[str, Any]]],
    grid: list[tuple[str, int, float, float]],
    device: str,
) -> list[dict[str, Any]]:
    """One row per (sampler, steps, guidance, shift): held-out scores and seconds per image."""
    reader = CacheReader(cfg.cache, version=cfg.cache_version)
    vae, encoders = sampling_parts(reader, cfg.model.encoders or reader.encoder_names, device)
    size = reader.manifest.image.resolution
    rows = []
    for sampler, steps, guidance, shift in grid:
        pipe = LiDiTPipeline(
            generator, vae, cfg.model.objective, encoders, sampler=sampler, device=device, flow_shift=shift
        )
        settings = EvalSection(prompts=len(prompts), sample_steps=steps, guidance_scale=guidance)
        t0 = time.perf_counter()
        report, _ = evaluate_pipeline(pipe, prompts, settings, size)
        row = {
            "sampler": sampler,
            "steps": steps,
            "guidance": guidance,
            "shift": shift,
            "s_per_image": round((time.perf_counter() - t0) / len(prompts), 3),
            **category_scores(report),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Sampler sweep",
        "",
        "`python benchmarks/sampler_sweep.py`: one saved generator scored on held-out prompts with each sampler,",
        "step count, guidance scale and sampling shift (training untouched). Euler makes one generator call (x2 with",
        "CFG) per step, Heun two per step but the last.",
        "",
    ]
    for label, rec in results.items():
        lines += [
            f"## `{label}`",
            "",
            f"Generator {rec['generator']}, config {rec['config']}; {rec['prompts']} held-out prompts; "
            f"{rec['machine']}; measured {rec['date']}.  ",
            *([f"{rec['note']}  "] if rec.get("note") else []),
            "",
            "| sampler | steps | guidance | shift | s/image | overall | colour | shape | binding | count | position "
            "| rel. holds | inverted |",
            "|" + "---|" * 13,
        ]
        for r in rec["rows"]:
            lines.append(
                f"| {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['shift']:g} | {r['s_per_image']:.3f} | "
                + " | ".join(fmt(r.get(k)) for k in (*CATEGORIES, *DIRECTIONS))
                + " |"
            )
        lines += [
            "",
            "rel. holds / inverted: of the relation scenes with both named objects found, the share with the "
            "relation right / placed the other way round (n/a: measured before this column).",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--generator", required=True, help="a LiDiTGenerator.save_pretrained folder")
    parser.add_argument("--config", required=True, help="the training YAML it was trained with")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--label", required=True, help="name of these rows in the results")
    parser.add_argument("--sampler", default="euler", help="comma-separated samplers of the objective")
    parser.add_argument("--steps", default="20", help="comma-separated sampler steps")
    parser.add_argument("--guidance", default="4", help="comma-separated guidance scales")
    parser.add_argument("--shift", default="", help="comma-separated sampling shifts (default: the config's)")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--starter", default=str(lidit_home() / "starter"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--note", help="a line kept with the rows (conditions of the measurement)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(TrainConfig, args.config, args.overrides)
    generator = LiDiTGenerator.from_pretrained(args.generator).to(args.device).eval()
    shifts = _floats(args.shift) or [cfg.model.flow_shift]
    grid = list(
        itertools.product(
            args.sampler.split(","), [int(s) for s in args.steps.split(",")], _floats(args.guidance), shifts
        )
    )
    prompts = heldout_prompts(args.starter, args.prompts)
    rows = sweep(generator, cfg, prompts, grid, args.device)

    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sampler_sweep.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[args.label] = {
        "generator": args.generator,
        "config": args.config + (f" {args.overrides}" if args.overrides else ""),
        "prompts": len(prompts),
        "machine": f"{args.device} ({os.cpu_count()} cores), {args.threads} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "note": args.note,
        "rows": rows,
    }
    path.write_text(json.dumps(results, indent=2) + "\n")
    (out / "sampler_sweep.md").write_text(markdown(results))
    print(f"wrote {path} and {out / 'sampler_sweep.md'}")


if __name__ == "__main__":
    main()
