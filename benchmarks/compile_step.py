"""Variants of the one train step, interleaved in one process: per-block `torch.compile` against eager
blocks, or any config overrides against the config as it is.

    python benchmarks/compile_step.py --cache /work/lh/cache --config configs/starter/train_long_layout.yaml \\
        [--steps 130] [--threads 1 --batch 16]   # one Ray worker's share of the layout recipe's step
    ... --variants eager tanh-foreach --variant tanh-foreach=model.overrides.mlp_activation=gelu_tanh,\\
        optim.implementation=foreach --name step_kernels_layout   # the recipe against other kernels

Each variant is the config with overrides, built and wrapped as the loop builds one worker
(`training.parallelize.wrap_single_worker`) and trained with `training.step.train_step` on the run's first
global batches (`benchmarks/train_throughput.py: decoded_batches`, the real loader's order and padding):

- eager:      `scale.compile=false`
- compile@1:  `scale.compile=true` (the default `scale.compile_text_multiple=1`: no text padding, so one
              compile per text length the batches bring, up to torch's recompile limit)
- compile@16: `scale.compile=true scale.compile_text_multiple=16` (each batch's text tokens padded to 16s)

`--variant NAME=KEY=VALUE,KEY=VALUE` adds a variant with other overrides (repeatable; list it in `--variants`).
Every variant runs `--warmup` steps first (where the compiles happen), then the variants take turns, `--chunk`
steps each, until each has run the rest: the box's drift (10-20% over minutes here) falls on all of them
alike. A compiled variant that meets a text length after the warm-up recompiles inside the timed steps, as it
would in a run. Writes benchmarks/results/NAME.{md,json} (`--name`, default compile_step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train_throughput import decoded_batches, load_avg  # noqa: E402
from lidit.cache.reader import CacheReader  # noqa: E402
from lidit.config import lidit_home, load_config  # noqa: E402
from lidit.generator import LiDiTGenerator  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.loop import build_generator_config  # noqa: E402
from training.parallelize import wrap_single_worker  # noqa: E402
from training.state import EMA  # noqa: E402
from training.step import build_optimizer, step_generator, train_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {
    "eager": ["scale.compile=false"],
    "compile@1": ["scale.compile=true", "scale.compile_text_multiple=1"],
    "compile@16": ["scale.compile=true", "scale.compile_text_multiple=16"],
}


def variant_config(args: argparse.Namespace, overrides: list[str]) -> TrainConfig:
    base = [
        f"cache={args.cache}",
        f"steps={args.steps}",
        f"batch_size={args.batch}",
        "tracking.eval_starter=null",
    ]
    return load_config(TrainConfig, args.config, base + overrides)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    first = variant_config(args, [])
    reader = CacheReader(first.cache, version=first.cache_version)
    batches = decoded_batches(first, reader)
    lengths = sorted({tuple(t.states.shape[1] for t in batch[1]) for batch in batches})
    runs = []
    for name in args.variants:
        cfg = variant_config(args, VARIANTS[name])
        torch.manual_seed(cfg.seed)
        model = wrap_single_worker(LiDiTGenerator(build_generator_config(cfg, reader)), cfg.scale)
        optim, ema = build_optimizer(model, cfg), EMA(model, cfg.optim.ema_decay)
        runs.append({"name": name, "cfg": cfg, "model": model, "optim": optim, "ema": ema, "seconds": 0.0})

    def step(run: dict, i: int) -> None:
        latents, texts, layout, negatives = batches[i]
        draws = step_generator(run["cfg"].seed, 0, i)
        # On CPU every op has finished when train_step returns: no sync needed before the clock reads.
        train_step(
            run["model"],
            run["optim"],
            run["ema"],
            latents,
            texts,
            run["cfg"],
            i,
            draws,
            None,
            negatives,
            layout,
        )

    for run in runs:
        t0 = time.perf_counter()
        for i in range(args.warmup):
            step(run, i)
        run["warmup_s"] = round(time.perf_counter() - t0, 1)
        print(f"[compile_step] {run['name']}: {args.warmup} warm-up steps in {run['warmup_s']} s", flush=True)
    for start in range(args.warmup, args.steps, args.chunk):
        for run in runs:
            t0 = time.perf_counter()
            for i in range(start, min(start + args.chunk, args.steps)):
                step(run, i)
            run["seconds"] += time.perf_counter() - t0
    timed = args.steps - args.warmup
    eager = next((r for r in runs if r["name"] == "eager"), None)
    rows = []
    for run in runs:
        rate = timed * args.batch / run["seconds"]
        row = {"variant": run["name"], "overrides": VARIANTS[run["name"]], "warmup_s": run["warmup_s"]}
        row.update({"ms_per_step": round(1000 * run["seconds"] / timed, 1), "samples_per_s": round(rate, 1)})
        if eager is not None:
            row["vs_eager"] = round(eager["seconds"] / run["seconds"], 3)
        rows.append(row)
    return {"rows": rows, "text_lengths": [list(x) for x in lengths], "timed_steps": timed}


def write_results(result: dict[str, Any], name: str) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Step variants against eager blocks (the one train step, interleaved in one process)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; {result['threads']} thread(s)  ",
        f"Load average (1, 5, 15 min): {result['load_before']} before, {result['load_after']} after  ",
        f"Config: `{result['config']}`, batch {result['batch']}; {result['warmup']} warm-up steps per variant, "
        f"then {result['timed_steps']} timed steps each in turns of {result['chunk']}  ",
        f"Text lengths per branch in these batches (prefix + prompt, before padding): "
        f"{', '.join('/'.join(map(str, x)) for x in result['text_lengths'])}  ",
        "Warm-up s: the first steps with their compiles, or with compiled graphs read back from torch's on-disk "
        "cache when an earlier run on this machine compiled the same shapes.",
        "",
        "| variant | overrides | warm-up s | ms/step | samples/s | vs eager |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['variant']} | `{' '.join(r['overrides'])}` | {r['warmup_s']} | {r['ms_per_step']} | "
            f"{r['samples_per_s']} | {r.get('vs_eager', 'n/a')} |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", default=str(lidit_home() / "cache"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "starter" / "train_long_layout.yaml"))
    parser.add_argument("--steps", type=int, default=130, help="steps per variant, warm-up included")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=10, help="steps per turn")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="another variant: NAME=KEY=VALUE[,KEY=VALUE...] (config overrides, as `--set`)",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="which variants run, in order")
    parser.add_argument("--name", default="compile_step", help="results file stem")
    parser.add_argument("--no-write", action="store_true", help="print only; keep the results files")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")
    for spec in args.variant:
        name, sep, overrides = spec.partition("=")
        if not sep or not name or not overrides:
            raise SystemExit(f"--variant {spec!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
        VARIANTS[name] = overrides.split(",")
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        raise SystemExit(
            f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)} (add with --variant)"
        )
    load_before = load_avg()
    result = measure(args)
    result.update(
        {
            "command": "python " + " ".join(sys.argv),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "threads": args.threads,
            "load_before": load_before,
            "load_after": load_avg(),
            "config": os.path.relpath(args.config, ROOT) if Path(args.config).is_absolute() else args.config,
            "batch": args.batch,
            "warmup": args.warmup,
            "chunk": args.chunk,
            "date": time.strftime("%Y-%m-%d"),
        }
    )
    text = json.dumps(result, indent=2) if args.no_write else write_results(result, args.name)
    print(text)


if __name__ == "__main__":
    main()
