"""Where data-parallel training time goes on CPU: `train_step` under each strategy, Ray-free, real cache batches.

    python benchmarks/train_strategies.py --cache /work/lh/cache [--steps 40] [--batch 32]

Each candidate runs `training.step.train_step` (the one step function) with a training config's model and
optimizer settings (`--config`, default the starter's; a layout or hard-negative recipe also gets the batch
extras the loop feeds it) in `--world` processes over gloo at `--threads` threads each (2 x 1 = the two cores
the Ray Train run uses), on each rank's slices of the run's first global batches
(`benchmarks/train_throughput.py: decoded_batches` over `training.data.bucketed_batches`, the order and
padding a real run has), and reports the median step time
after `--warmup` steps:

- fsdp / fsdp_keep_unsharded (`reshard_after_forward=False`) / replicate / single (one process, no wrapper)
- `+sync`: what the loop did before, an all-reduce and `.item()` of the loss after every step
- `+loop_ema`: the EMA update as it was, one `lerp_` per parameter (through DTensor dispatch under FSDP2)
- `+loop_adam`: AdamW at torch's CPU default (`foreach=None`: a Python loop over parameters)

This isolates the step from Ray, the data reader and checkpoints; `benchmarks/train_throughput.py` measures
the real run. Writes benchmarks/results/train_strategies.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lidit.cache.reader import CacheReader  # noqa: E402
from lidit.config import lidit_home, load_config  # noqa: E402
from lidit.generator import LiDiTGenerator  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.parallelize import parallelize, repeated_blocks  # noqa: E402
from training.state import EMA  # noqa: E402
from training.step import build_optimizer, step_generator, train_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CANDIDATES = [
    "fsdp+sync+loop_ema+loop_adam",  # the step as it was when Ray Train measured 97 samples/s
    "fsdp+sync",
    "fsdp+loop_ema",
    "fsdp+loop_adam",
    "fsdp",
    "fsdp_keep_unsharded",
    "replicate+sync",
    "replicate+loop_ema+loop_adam",
    "replicate",
    "single",  # one process at world x threads threads: the bare loop
]


class LoopEMA(EMA):
    """The EMA update before the multi-tensor version, kept only as a measured baseline."""

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)


def _worker(rank: int, world: int, candidate: str, args: argparse.Namespace, port: int, out: str) -> None:
    strategy, *flags = candidate.split("+")
    single = strategy == "single"
    torch.set_num_threads(args.threads * args.world if single else args.threads)  # single: all the cores
    if not single:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from benchmarks.train_throughput import decoded_batches
    from training.loop import build_generator_config

    cfg = load_config(
        TrainConfig, args.config, [f"cache={args.cache}", f"batch_size={args.batch}", "scale.workers=1"]
    )
    reader = CacheReader(cfg.cache, version=cfg.cache_version)
    # With the loop's batch extras (layout targets, hard negatives) when the config weights them: a layout
    # recipe without its targets leaves the layout head out of the loss, and replicas refuse unused parameters.
    batches = decoded_batches(cfg, reader, rank, 1 if single else world, count=args.warmup + args.steps)
    torch.manual_seed(cfg.seed)
    model = LiDiTGenerator(build_generator_config(cfg, reader))
    if strategy in ("fsdp", "replicate"):
        parallelize(model, init_device_mesh("cpu", (world,)), strategy=strategy)
    elif strategy == "fsdp_keep_unsharded":
        mesh = init_device_mesh("cpu", (world,))
        for container, i in repeated_blocks(model):
            fully_shard(container[i], mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
    optim = build_optimizer(model, cfg)
    if "loop_adam" in flags:
        optim = torch.optim.AdamW(
            model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
        )
    ema = (LoopEMA if "loop_ema" in flags else EMA)(model, cfg.optim.ema_decay)
    times = []
    for step in range(args.warmup + args.steps):
        latents, texts, layout, negatives = batches[step]
        t0 = time.perf_counter()
        draws = step_generator(cfg.seed, rank, step)
        result = train_step(
            model, optim, ema, latents, texts, cfg, step, draws, negatives=negatives, layout=layout
        )
        if "sync" in flags:
            loss = result.loss.clone()
            if not single:
                dist.all_reduce(loss)
            loss.item()
        times.append(time.perf_counter() - t0)
    if not single:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(times[args.warmup :]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(candidate: str, args: argparse.Namespace) -> dict[str, Any]:
    world = 1 if candidate.startswith("single") else args.world
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        mp.start_processes(
            _worker, args=(world, candidate, args, _free_port(), out), nprocs=world, start_method="spawn"
        )
        times = json.loads(Path(out).read_text())
    step_s = statistics.median(times)
    return {
        "candidate": candidate,
        "processes_x_threads": f"{world} x {args.threads * args.world // world}",
        "median_step_ms": round(step_s * 1e3, 1),
        "samples_per_s": round(args.batch / step_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", default=str(lidit_home() / "cache"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "starter" / "train.yaml"))
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for candidate in args.candidates:
        rows.append(measure(candidate, args))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": f"python {os.path.relpath(Path(sys.argv[0]).resolve(), ROOT)} {' '.join(sys.argv[1:])}".strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "batch": args.batch,
        "rows": rows,
    }
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_strategies.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Train step under each data-parallel candidate (Ray-free, gloo on CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Load average (1, 5, 15 min): {result['load_before']} before, {result['load_after']} after  ",
        f"Global batch {args.batch}, median of {args.steps} steps after {args.warmup}; `training.step.train_step` "
        "with the starter config's model.",
        "",
        "| candidate | processes x threads | median step ms | samples/s |",
        "|---|---|---|---|",
        *(
            f"| {r['candidate']} | {r['processes_x_threads']} | {r['median_step_ms']} | {r['samples_per_s']} |"
            for r in rows
        ),
    ]
    (RESULTS / "train_strategies.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
