"""Training throughput: the platform's Ray Train run against a bare loop of the same step on the same cores.

    LIDIT_HOME=/tmp/lidit_bench python benchmarks/train_throughput.py --cache /work/lh/cache \\
        [--steps 150] [--batch 32] [--runs auto:2x1 fsdp:2x1 replicate:1x2] [--threads 2]
    ... --config configs/starter/train_long_layout.yaml --name train_throughput_layout   # the layout recipe
    ... --config configs/starter/train_shapes.yaml --name train_throughput_shapes   # shape hard negatives

Both sides run `training.step.train_step` (the one step function) on a training config (default the starter's,
`configs/starter/train.yaml`: `tiny` preset, every encoder of the cache; a config with `model.layout_weight`
or `model.hard_negative_weight` also feeds both the batches' layout targets or hard negatives), the same batch
and cache:

- bare:   one process, `--threads` intra-op threads, no Ray and no data-parallel wrapper, on the same global
          batches in the same order as the run (`training.data.bucketed_batches` at world 1), decoded before
          the clock starts: the step alone. It runs before and after the Ray runs, and the reference is the
          mean of the two, because this box's speed drifts by 10-20% over minutes (a fixed batch, no other
          process, no CPU steal: 116-140 samples/s in 25-step windows).
- in-Ray: a real `training.train.run_training` (Ray Train V2, the training loop, its data reader,
          checkpoints at the config's interval) per `--runs` entry `STRATEGY:WORKERSxTHREADS`; samples/s is
          what the loop logs to MLflow every `tracking.log_every` steps.

Both report the median over logging windows of `log_every` steps, leaving out the first window (start-up:
Ray Train's worker group, first-step allocations). Writes benchmarks/results/NAME.{md,json} (`--name`,
default train_throughput) with
the machine, the box's load average before and after, and the command. The numbers only mean something on
a quiet box: look at the recorded load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lidit.cache.reader import CacheReader  # noqa: E402
from lidit.config import lidit_home, load_config  # noqa: E402
from lidit.generator import LiDiTGenerator  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.state import EMA  # noqa: E402
from training.step import MetricWindow, build_optimizer, step_generator, train_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STARTER_CONFIG = ROOT / "configs" / "starter" / "train.yaml"


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_config(args: argparse.Namespace, name: str, strategy: str, workers: int) -> TrainConfig:
    """The config at the benchmark's size; no registration, sample grid or held-out scoring (all after the clock)."""
    overrides = [
        f"cache={args.cache}",
        f"name={name}",
        f"storage_path={args.storage}",
        f"steps={args.steps}",
        f"batch_size={args.batch}",
        f"scale.workers={workers}",
        f"scale.strategy={strategy}",
        f"tracking.log_every={args.log_every}",
        "tracking.experiment=lidit-bench-throughput",
        "tracking.registered_model=null",
        "tracking.num_samples=0",
        "tracking.eval_starter=null",
    ]
    return load_config(TrainConfig, args.config, overrides)


def steady_rate(windows: list[float]) -> float:
    """Median samples/s over the logging windows after the first (start-up) one."""
    if len(windows) < 2:
        raise SystemExit("need at least 2 logging windows: raise --steps or lower --log-every")
    return statistics.median(windows[1:])


def decoded_batches(
    cfg: TrainConfig, reader: CacheReader, rank: int = 0, world: int = 1, count: int | None = None
) -> list[tuple]:
    """The run's first `count` (default `cfg.steps`) batches of `rank` of `world` (each `cfg.batch_size //
    world` rows; default the global batches at world 1) as `train_step` takes them: (latents, texts, layout,
    negatives), decoded before any clock starts. Recipes with layout targets or hard negatives also read them
    per batch, as in the Ray loop."""
    from training.data import bucketed_batches
    from training.loop import batch_extras, select_branches, select_layout, select_negatives

    names = cfg.model.encoders or reader.encoder_names
    count = cfg.steps if count is None else count
    per_rank = cfg.batch_size // world
    batches, source = [], bucketed_batches(reader, per_rank, rank, world, cfg.seed, **batch_extras(cfg))
    for batch in source:
        texts = select_branches(batch.texts, reader, names)
        hard = select_negatives(batch.negatives, reader, names)
        batches.append((batch.latents, texts, select_layout(batch.layout, reader, names), hard))
        if len(batches) == count:
            break
    source.close()  # stops its read-ahead threads before the clock starts
    return batches


def bare_loop(args: argparse.Namespace) -> dict[str, Any]:
    """`train_step` in a plain loop: one process, no Ray, no data-parallel wrapper, pre-decoded batches."""
    from training.loop import build_generator_config
    from training.parallelize import wrap_single_worker

    torch.set_num_threads(args.threads)
    cfg = run_config(args, "bare", "auto", 1)
    reader = CacheReader(cfg.cache, version=cfg.cache_version)
    batches = decoded_batches(cfg, reader)
    torch.manual_seed(cfg.seed)
    model = LiDiTGenerator(build_generator_config(cfg, reader))
    wrap_single_worker(model, cfg.scale)
    optim = build_optimizer(model, cfg)
    ema = EMA(model, cfg.optim.ema_decay)
    window, rates, losses = MetricWindow(), [], []
    for step in range(cfg.steps):
        latents, texts, layout, hard = batches[step]
        draws = step_generator(cfg.seed, 0, step)
        window.add(train_step(model, optim, ema, latents, texts, cfg, step, draws, None, hard, layout))
        if (step + 1) % cfg.tracking.log_every == 0:
            loss, _ = window.reduce()  # the same one read per window as the Ray loop
            steps = window.steps
            rates.append(steps * cfg.batch_size / window.reset())
            losses.append(loss)
    return {
        "threads": args.threads,
        "samples_per_s": round(steady_rate(rates), 1),
        "window_samples_per_s": [round(r, 1) for r in rates],
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
    }


def ray_run(args: argparse.Namespace, spec: str) -> dict[str, Any]:
    """One real `run_training` for `STRATEGY:WORKERSxTHREADS`, in a private Ray started for it.

    A fresh Ray per run because workers inherit `LIDIT_TRAIN_THREADS` from the environment Ray started in.
    """
    import mlflow
    import ray

    from training.train import run_training

    strategy, shape = spec.split(":")
    workers, threads = (int(x) for x in shape.split("x"))
    os.environ["LIDIT_TRAIN_THREADS"] = str(threads)
    os.environ["RAY_ADDRESS"] = "local"  # never join another engineer's cluster on a shared box
    name = f"bench-{strategy}-{workers}x{threads}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = run_config(args, name, strategy, workers)
    try:
        t0 = time.perf_counter()
        summary = run_training(cfg)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    history = mlflow.MlflowClient().get_metric_history(summary["mlflow_run_id"], "samples_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    return {
        "run": spec,
        "strategy": strategy,
        "workers": workers,
        "threads_per_worker": threads,
        "samples_per_s": round(steady_rate(rates), 1),
        "window_samples_per_s": [round(r, 1) for r in rates],
        "final_loss": summary["final_loss"],
        "wall_s_incl_startup": round(wall, 1),
        "mlflow_run_id": summary["mlflow_run_id"],
    }


def write_results(result: dict[str, Any], name: str) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    bare = result["bare"]
    lines = [
        "# Training throughput: Ray Train vs a bare loop of the same step",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Load average (1, 5, 15 min): {result['load_before']} before, {result['load_after']} after  ",
        f"Config: `{result['config']}`  ",
        f"Model: `{result['preset']}` preset, {bare['params_M']}M parameters, encoders of the cache; batch "
        f"{result['batch']}, {result['steps']} steps; samples/s = median over {result['log_every']}-step "
        "windows after the first.",
        "",
        "| run | strategy | workers x threads | samples/s | vs bare | windows (samples/s) |",
        "|---|---|---|---|---|---|",
        f"| bare loop (`train_step`, no Ray), mean of before / after | none | 1 x {bare['threads']} | "
        f"{bare['samples_per_s']} ({' / '.join(map(str, bare['before_after_samples_per_s']))}) | 1.00 | "
        f"{' / '.join(', '.join(map(str, w)) for w in bare['window_samples_per_s'])} |",
    ]
    for r in result["ray"]:
        lines.append(
            f"| `run_training` | {r['strategy']} | {r['workers']} x {r['threads_per_worker']} | "
            f"{r['samples_per_s']} | {r['ratio']:.2f} | {', '.join(map(str, r['window_samples_per_s']))} |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", default=str(lidit_home() / "cache"))
    parser.add_argument("--config", default=str(STARTER_CONFIG))
    parser.add_argument("--storage", default=str(lidit_home() / "runs"), help="Ray Train storage of the runs")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2, help="threads of the bare loop (the cores)")
    parser.add_argument(
        "--runs", nargs="*", default=["auto:2x1"], help="in-Ray runs, STRATEGY:WORKERSxTHREADS each"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; keep the results files")
    parser.add_argument(
        "--name", default="train_throughput", help="results file stem (benchmarks/results/NAME.{md,json})"
    )
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    load_before = load_avg()
    bare_runs = [bare_loop(args)]
    print(f"bare: {json.dumps(bare_runs[0])}", flush=True)
    runs = []
    for spec in args.runs:
        runs.append(ray_run(args, spec))
        print(f"ray: {json.dumps(runs[-1])}", flush=True)
    if runs:  # bracket the Ray runs: the reference is the mean of the bare loop before and after
        bare_runs.append(bare_loop(args))
        print(f"bare: {json.dumps(bare_runs[1])}", flush=True)
    bare = {
        **bare_runs[0],
        "samples_per_s": round(statistics.mean(b["samples_per_s"] for b in bare_runs), 1),
        "before_after_samples_per_s": [b["samples_per_s"] for b in bare_runs],
        "window_samples_per_s": [b["window_samples_per_s"] for b in bare_runs],
    }
    for r in runs:
        r["ratio"] = round(r["samples_per_s"] / bare["samples_per_s"], 3)
    cfg = run_config(args, "bare", "auto", 1)
    home = f"LIDIT_HOME={os.environ['LIDIT_HOME']} " if "LIDIT_HOME" in os.environ else ""
    script = os.path.relpath(Path(sys.argv[0]).resolve(), ROOT)
    result = {
        "command": f"{home}python {' '.join([script, *sys.argv[1:]])}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        "load_before": load_before,
        "load_after": load_avg(),
        "config": os.path.relpath(Path(args.config).resolve(), ROOT),
        "preset": cfg.model.preset,
        "batch": args.batch,
        "steps": args.steps,
        "log_every": args.log_every,
        "cache": args.cache,
        "bare": bare,
        "ray": runs,
    }
    text = write_results(result, args.name) if not args.no_write else json.dumps(result, indent=2)
    print(text)


if __name__ == "__main__":
    main()
