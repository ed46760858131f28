"""Load test of the serving app: throughput and p50/p99 latency at several concurrencies, batching on vs off.

    python benchmarks/serve_load.py [--model models:/NAME@ALIAS | EXPORT_DIR] [--duration 20]

Without --model it builds the tiny test export (two tiny LMs, tiny VAE, tiny generator) in a temp dir. It
starts local Ray + Serve on 127.0.0.1, deploys the app twice side by side, with batching (/on) and without
(/off: batches of one), drives them with closed-loop async HTTP clients in interleaved rounds (on/off, then
off/on, per concurrency), and writes `benchmarks/results/serve_load.{md,json}` with medians over the rounds and
each round's paired batched / unbatched ratio.
Goals (issues 6, 15): batched >= unbatched throughput at every concurrency, >= 3x at concurrency 16, batched
p50 at concurrency 1 within 1.2x of unbatched; p99 <= 2x p50 below capacity.

The step-time curve (Ray-free, before the load test) times the generator replica's batch work itself,
`LiDiTPipeline.generate_from_features` (CFG + sampler + VAE decode), at each batch size: when the time per
batch grows in proportion to the batch, the CPU is already busy at batch 1 and batching cannot add throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "a red circle to the left of a blue square",
    "two green triangles above a yellow circle",
    "a small purple square below three orange circles",
    "one blue circle",
    "three yellow squares",
]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


async def drive(url: str, concurrency: int, duration: float, body: dict) -> dict:
    """Closed loop: `concurrency` clients each send the next request as soon as the last one returns."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + duration

    async def worker(w: int, client: httpx.AsyncClient) -> None:
        nonlocal errors
        i = 0
        while time.monotonic() < stop_at:
            req = dict(body, prompt=PROMPTS[(w + i) % len(PROMPTS)], seed=w * 100_000 + i)
            t0 = time.monotonic()
            r = await client.post(url + "/v1/images/generations", json=req)
            if r.status_code == 200:
                latencies.append(time.monotonic() - t0)
            else:
                errors += 1
            i += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.monotonic()
        await asyncio.gather(*(worker(w, client) for w in range(concurrency)))
        elapsed = time.monotonic() - t0
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 3),
        "p50_s": round(percentile(latencies, 50), 4) if latencies else None,
        "p99_s": round(percentile(latencies, 99), 4) if latencies else None,
        "mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
    }


def build_tiny_model(root: Path) -> str:
    from tests.serving.export import build_export, build_shared_assets

    encoders, vae = build_shared_assets(root / "assets")
    return str(build_export(root / "export", encoders, vae, seed=1))


def step_curve(model: str, sizes: list[int], steps: int, hw: tuple[int, int], repeats: int = 3) -> list[dict]:
    """Seconds per generator batch (best of `repeats`) at each batch size, on the code serving runs."""
    import torch

    from lidit.pipeline import LiDiTPipeline

    # One thread, as in the generator replica (Ray sets OMP_NUM_THREADS to its 1 CPU): a 2-thread torch on
    # a box whose cores other jobs hold spins in OpenMP barriers (seen: 44 s for one 8-step 64 px batch).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = LiDiTPipeline.from_pretrained(model)
    rows = []
    for b in sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        texts = pipe.encode(prompts)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            pipe.generate_from_features(texts, list(range(b)), hw[1], hw[0], steps, 4.0)
            best = min(best, time.perf_counter() - t0)
        rows.append({"batch": b, "seconds": round(best, 4), "images_per_s": round(b / best, 2)})
        print(json.dumps(rows[-1]), flush=True)
    rows_one = rows[0]["seconds"]
    for r in rows:
        r["vs_batch_1"] = round(r["seconds"] / rows_one, 2)  # 1.0 = free batching, = batch = none
    torch.set_num_threads(threads)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from lidit.config import load_config
    from serving.app import build_app
    from serving.config import ServeConfig

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    os.environ.setdefault("LIDIT_HOME", str(tmp / "home"))
    model = args.model or build_tiny_model(tmp)
    w, h = (int(x) for x in args.size.split("x"))
    curve = step_curve(model, args.curve_sizes, args.steps, (w, h)) if args.curve_sizes else []
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    body = {"size": args.size, "num_inference_steps": args.steps, "n": 1}
    modes = {"on": True, "off": False}
    rows = []
    try:
        # Both apps stay deployed and the rounds interleave them (on/off, then off/on), so a drift in what
        # else the box is doing hits both modes alike; idle replicas cost no CPU.
        for name, batching in modes.items():
            cfg = load_config(
                ServeConfig,
                None,
                [
                    f"model={model}",
                    f"port={port}",
                    f"route_prefix=/{name}",
                    f"batching.enabled={str(batching).lower()}",
                    f"batching.generator_max_batch_size={args.max_batch}",
                    "deployments.generator.num_cpus=1.0",
                    "deployments.encoder.num_cpus=0.5",
                    "auth.api_key_env=LIDIT_BENCH_UNSET",
                    f"limits.max_side={max(w, h)}",
                    *args.set,
                ],
            )
            serve.run(build_app(cfg), name=f"bench-{name}", route_prefix=f"/{name}", blocking=False)
            asyncio.run(drive(f"{url}/{name}", 4, 3.0, body))  # warm-up: first calls pay lazy init
        gens = {n: serve.get_deployment_handle("Generator", app_name=f"bench-{n}") for n in modes}
        for r in range(args.rounds):
            for c in args.concurrency:
                for name in list(modes)[:: 1 if r % 2 == 0 else -1]:
                    before = gens[name].stats.remote().result()
                    row = asyncio.run(drive(f"{url}/{name}", c, args.duration, body))
                    after = gens[name].stats.remote().result()
                    batches = after["batches"] - before["batches"]
                    row["mean_generator_batch"] = round(
                        (after["requests"] - before["requests"]) / max(batches, 1), 2
                    )
                    row["batching"] = modes[name]
                    row["round"] = r
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "model": model if args.model else "tiny test export (tests/serving/export.py)",
        "size": args.size,
        "steps": args.steps,
        "guidance": "default (CFG on: 2 rows per image)",
        "generator_max_batch_size": args.max_batch,
        "overrides": args.set,
        "duration_s_per_level": args.duration,
        "rounds": args.rounds,
        "host": {
            "cpus": os.cpu_count(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
        "rows": rows,
        "step_curve": curve,
    }


def medians(result: dict) -> dict[tuple[bool, int], dict]:
    """Per (batching, concurrency): the median over rounds of throughput, p50 and p99, and the paired
    batched / unbatched throughput ratio of each round (both modes of a round ran back to back)."""
    by_key: dict[tuple[bool, int], list[dict]] = {}
    for r in result["rows"]:
        by_key.setdefault((r["batching"], r["concurrency"]), []).append(r)
    out = {}
    for key, rs in by_key.items():
        out[key] = {k: statistics.median(r[k] for r in rs) for k in ("throughput_rps", "p50_s", "p99_s")} | {
            "rounds": len(rs),
            "errors": sum(r["errors"] for r in rs),
        }
    for batching, c in list(out):
        if batching and (False, c) in out:
            on = {r.get("round", 0): r for r in by_key[(True, c)]}
            off = {r.get("round", 0): r for r in by_key[(False, c)]}
            out[(True, c)]["ratios"] = sorted(
                on[k]["throughput_rps"] / off[k]["throughput_rps"] for k in on if k in off
            )
    return out


def verdicts(result: dict) -> list[str]:
    rows = medians(result)
    out = []
    for c in sorted({c for _, c in rows}):
        ratios = rows.get((True, c), {}).get("ratios")
        if ratios:
            ratio = statistics.median(ratios)
            # "level": below 1 at the median, but 1 lies inside the spread of the paired rounds, so the run
            # cannot tell the modes apart (at c=1 they run the same code: a batch of one either way).
            verdict = "met" if ratio >= 1 else "level" if ratios[0] <= 1 <= ratios[-1] else "MISSED"
            out.append(
                f"- c={c}: batched / unbatched throughput {ratio:.2f}x, median of {len(ratios)} paired rounds "
                f"({ratios[0]:.2f}-{ratios[-1]:.2f}) (goal >= 1: {verdict})"
            )
    on1, off1 = rows.get((True, 1)), rows.get((False, 1))
    if on1 and off1 and off1["p50_s"]:
        q = on1["p50_s"] / off1["p50_s"]
        out.append(
            f"- c=1: batched p50 / unbatched p50 = {q:.2f} (goal <= 1.2: {'met' if q <= 1.2 else 'MISSED'})"
        )
    top = max(c for _, c in rows)
    ratios = rows.get((True, top), {}).get("ratios")
    if ratios:
        ratio = statistics.median(ratios)
        out.append(
            f"- batched / unbatched throughput at concurrency {top}: {ratio:.2f}x "
            f"(goal >= 3x: {'met' if ratio >= 3 else 'MISSED'})"
        )
    for (batching, c), r in sorted(rows.items()):
        if c < top and r["p50_s"]:
            q = r["p99_s"] / r["p50_s"]
            mode = "batched" if batching else "unbatched"
            out.append(f"- {mode} c={c}: p99/p50 = {q:.2f} (goal <= 2: {'met' if q <= 2 else 'MISSED'})")
    return out


def write(result: dict, out_dir: Path, tag: str = "") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"serve_load{'_' + tag if tag else ''}.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Serving load test",
        "",
        f"Model: {result['model']}; {result['size']}, {result['steps']} steps, {result['guidance']}; "
        f"generator max batch {result['generator_max_batch_size']}; {result['duration_s_per_level']} s per row; "
        f"overrides {result.get('overrides') or 'none'}.",
        f"Host: {result['host']['cpus']} CPUs, load average at start {result['host']['load_avg_at_start']}.",
        "",
        "Medians over the interleaved rounds (both modes of a round run back to back, in alternating order):",
        "",
        "| batching | concurrency | rounds | errors | throughput (req/s) | p50 (s) | p99 (s) | paired ratio on/off |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (batching, c), m in sorted(medians(result).items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        ratios = ", ".join(f"{x:.2f}" for x in m.get("ratios", []))
        lines.append(
            f"| {'on' if batching else 'off'} | {c} | {m['rounds']} | {m['errors']} | {m['throughput_rps']:.2f} | "
            f"{m['p50_s']} | {m['p99_s']} | {ratios} |"
        )
    lines += [
        "",
        "Every row:",
        "",
        "| round | batching | concurrency | requests | errors | throughput (req/s) | p50 (s) | p99 (s) | mean batch |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r.get('round', 0)} | {'on' if r['batching'] else 'off'} | {r['concurrency']} | {r['requests']} | "
            f"{r['errors']} | {r['throughput_rps']:.2f} | {r['p50_s']} | {r['p99_s']} | "
            f"{r.get('mean_generator_batch', '')} |"
        )
    if result.get("step_curve"):
        lines += [
            "",
            "## Generator step time by batch size (Ray-free, `LiDiTPipeline.generate_from_features`)",
            "",
            "| batch | seconds per batch | images/s | time vs batch 1 |",
            "|---:|---:|---:|---:|",
            *(
                f"| {r['batch']} | {r['seconds']} | {r['images_per_s']} | {r['vs_batch_1']}x |"
                for r in result["step_curve"]
            ),
        ]
    lines += ["", "## Goals", "", *verdicts(result), ""]
    (out_dir / f"serve_load{'_' + tag if tag else ''}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="models:/NAME@ALIAS or a pipeline export dir (default: tiny test export)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per (mode, concurrency) row")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=3, help="interleaved on/off rounds per concurrency")
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ServeConfig override")
    p.add_argument("--tag", default="", help="suffix of the results files (serve_load_TAG.md)")
    p.add_argument(
        "--curve-sizes",
        type=int,
        nargs="*",
        default=[1, 2, 4, 8, 16],
        help="step-time curve batch sizes (none: skip)",
    )
    args = p.parse_args()
    write(run(args), args.out, args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
