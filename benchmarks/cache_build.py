"""Cache build benchmark: the Ray pipeline vs a bare single-process loop, bytes per sample, driver memory.

    python benchmarks/cache_build.py [--starter DIR] [--limit N] [--replicate K] [--out benchmarks/results]
    python benchmarks/cache_build.py --rss 5000       # driver peak RSS of builds of N and 4N rows

Driver memory (`--rss N`): `python -m pipelines.build` (the real entry point, joined to a running Ray) builds
caches of N and 4N rows (the starter rows tiled with new ids); each build reports its own peak RSS
(`ru_maxrss`, in the summary). The driver plans and commits only: its memory must not grow with rows
(goal: 4N / N <= 1.2). Results in `cache_build_rss.{json,md}`.

Both paths run the same models on the same rows: decode PNG -> bucket resize -> VAE latents (batched) ->
states of each encoder (batched, prefix sharing) -> half precision -> one Parquet output. The bare loop uses
all cores in one process (torch's default threads); the pipeline runs on a local Ray with the starter config's
stage resources. Both run as fresh processes, so timings include interpreter start, imports and model loading
on both sides; the Ray cluster is started beforehand (as on a real cluster) and not timed.

Bytes per sample are compared with the padded-fp32 layout (what Anyscale's SD pre-training cache stores):
fp32 latents plus, per encoder, fp32 states of prefix + prompt padded to max_length for every sample. It is
reported both as raw tensor bytes and as the Parquet file that layout writes (zstd, same as ours).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lidit.cache.reader import CacheReader  # noqa: E402
from lidit.encoder import EncoderConfig, PromptEncoder  # noqa: E402
from lidit.pipeline import vae_to_latents  # noqa: E402
from pipelines.config import load_build_config  # noqa: E402
from pipelines.stages import choose_bucket, decode_image, resize_to_bucket  # noqa: E402

NOTES = """
Notes:
- End to end includes, on both sides, a fresh interpreter, imports and model loads; the pipeline also pays one
  worker process per stage (3 actors + decode tasks, each importing torch) on 2 cores: a fixed ~25-35 s. Tile
  the starter rows (`--replicate K`) until that is amortised: 3000 rows cannot (the bare loop's whole run is
  ~5-20 s), 96000 rows do (`--replicate 4` of today's 24000-row starter, `--replicate 32` of the 3000-row one
  these rows were measured on; ~2.5 min a side); on a quiet box
  24000 / 48000 / 96000 rows measured 0.71x / 0.72x / 1.02x end to end.
- Stage threads: one torch thread per actor (`vae_stage.threads: 1`). With the VAE actor at 2 threads beside
  the two encoder actors and the decode tasks, the 2 cores were oversubscribed and the pipeline's steady rate
  fell to 540-562 rows/s (0.72x-0.93x the bare loop); at 1 thread it was 703-832 rows/s (0.98x-1.27x).
- Steady state: rows/s of the bare loop with models loaded vs the pipeline's least-squares rate of rows over
  shard completions (`pipelines.execute.steady_rate`: start-up excluded, and the units in flight when the first
  shard lands do not count as made after it). The pipeline can pass the bare loop here: its stages overlap
  (decode, VAE, the encoders and the Parquet writes run at once), the bare loop runs them one after another.
- The padded-fp32 Parquet is small on this data because the starter set is extremely repetitive (black
  backgrounds, one shared instruction prefix repeated per row): Parquet's dictionary encoding stores the
  repeated floats once. The raw layout ratio is what training memory / a real-image cache sees.
- Timings vary run to run on a shared 2-core box; the load average at the end is in the header.
"""


def bare_loop(cfg, rows: list[dict], out: Path) -> float:
    """Everything in one process, one pass, batched like the pipeline. Returns the loop's seconds
    (model loading excluded: the steady-state rate)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(cfg.vae).eval()
    encoders = [PromptEncoder(EncoderConfig.model_validate(e.model_dump())) for e in cfg.encoders]
    t0 = time.perf_counter()
    buckets = cfg.bucket_list()
    records = []
    bs = cfg.vae_stage.batch_size
    for start in range(0, len(rows), bs):
        chunk = rows[start : start + bs]
        pixels, keep = [], []
        for r in chunk:
            im = decode_image(r["image"], cfg.max_image_pixels, cfg.min_image_side)
            pixels.append(resize_to_bucket(im, choose_bucket(im.width, im.height, buckets)))
            keep.append(r)
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            z = vae_to_latents(vae.encode(x).latent_dist.mean, vae).half()
        caps = [r["caption"] for r in keep]
        states = [[s.half() for s in enc.encode_prompts(caps).unpadded()] for enc in encoders]
        for j, r in enumerate(keep):
            rec = {"id": r["id"], "caption": r["caption"], "latent": z[j].numpy().tobytes()}
            for enc, st in zip(encoders, states, strict=True):
                rec[f"states_{enc.name}"] = st[j].numpy().tobytes()
                rec[f"length_{enc.name}"] = st[j].shape[0]
            records.append(rec)
    pq.write_table(pa.Table.from_pylist(records), out, compression="zstd")
    return time.perf_counter() - t0


def padded_fp32_bytes(reader: CacheReader, out: Path) -> tuple[float, float]:
    """(raw bytes/sample, Parquet bytes/sample) of the padded-fp32 layout for the cache's rows."""
    m = reader.manifest
    table = reader.to_arrow()
    n = table.num_rows
    cols: dict[str, pa.Array] = {"id": table.column("id")}
    raw = 0
    from lidit.cache import contract as C

    lat = np.stack(
        [
            C.decode_tensor(b, m.vae.dtype, (m.vae.latent_channels, h, w)).float().numpy().ravel()
            for b, h, w in zip(
                table.column(C.COL_LATENT).to_pylist(),
                table.column(C.COL_LATENT_HEIGHT).to_pylist(),
                table.column(C.COL_LATENT_WIDTH).to_pylist(),
                strict=True,
            )
        ]
    ).astype(np.float32)
    cols["latent"] = pa.FixedSizeListArray.from_arrays(pa.array(lat.ravel()), lat.shape[1])
    raw += lat.shape[1] * 4
    for e in m.encoders:
        t_max = e.prefix_len + int(e.config["max_length"])
        prefix = reader.prefix_states(e.name).float().numpy()
        arr = np.zeros((n, t_max, e.hidden_size), np.float32)
        for i, (b, length) in enumerate(
            zip(
                table.column(C.states_column(e.name)).to_pylist(),
                table.column(C.length_column(e.name)).to_pylist(),
                strict=True,
            )
        ):
            arr[i, : e.prefix_len] = prefix
            arr[i, e.prefix_len : e.prefix_len + length] = C.decode_tensor(
                b, e.dtype, (length, e.hidden_size)
            ).float()
        flat = arr.reshape(n, -1)
        cols[f"states_{e.name}"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
        cols[f"mask_{e.name}"] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.zeros(n * t_max, np.bool_)), t_max
        )
        raw += flat.shape[1] * 4 + t_max
    pq.write_table(pa.table(cols), out, compression="zstd")
    return float(raw), out.stat().st_size / n


def tiled_source(table: pa.Table, rows: int, path: Path) -> None:
    """`rows` rows: `table`'s rows repeated with new ids, in row groups of 256 (as a real dataset has)."""
    ids = table.column("id").to_pylist()
    reps = -(-rows // len(ids))
    parts = [table.set_column(0, "id", pa.array([f"{i}-r{k}" for i in ids])) for k in range(reps)]
    pq.write_table(pa.concat_tables(parts).slice(0, rows), path, row_group_size=256)


def run_build(cfg_file: Path) -> dict:
    """One `python -m pipelines.build CONFIG --json` process (the real entry point); its summary."""
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.build", str(cfg_file), "--json"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def rss_benchmark(starter: Path, n: int, out_dir: Path) -> int:
    """Driver peak RSS of builds of n and 4n rows (see the module doc)."""
    import ray

    work = Path(tempfile.mkdtemp(prefix="cache_rss_"))
    os.environ["LIDIT_HOME"] = str(work / "home")
    table = pq.read_table(starter / "data" / "train")
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    rows = []
    for k in (n, 4 * n):
        src = work / f"src{k}.parquet"
        tiled_source(table, k, src)
        overrides = [f"vae={starter / 'vae'}", "mlflow=false", "progress=false"]
        cfg = load_build_config(
            ROOT / "configs" / "starter" / "cache.yaml",
            overrides,
            sources=[str(src)],
            output=str(work / f"c{k}"),
        )
        cfg.encoders = [e.model_copy(update={"path": str(starter / Path(e.path).name)}) for e in cfg.encoders]
        cfg.ray.address = ray.get_runtime_context().gcs_address
        cfg_file = work / f"cache{k}.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        t0 = time.perf_counter()
        s = run_build(cfg_file)
        rows.append(
            {
                "source_rows": k,
                "cached_rows": s["rows"],
                "shards": s["shards"],
                "driver_peak_rss_mb": s["driver_peak_rss_mb"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(f"{k} rows: driver peak {s['driver_peak_rss_mb']} MB", file=sys.stderr)
    ray.shutdown()
    ratio = rows[1]["driver_peak_rss_mb"] / rows[0]["driver_peak_rss_mb"]
    res = {
        "rows": rows,
        "ratio_4n_over_n": round(ratio, 3),
        "goal": "<= 1.2",
        "met": ratio <= 1.2,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f} at end",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cache_build_rss.json").write_text(json.dumps(res, indent=1))
    md = io.StringIO()
    md.write("# Cache build: driver peak RSS vs source rows\n\n")
    md.write(
        "`python -m pipelines.build` on the starter rows tiled with new ids (configs/starter/cache.yaml, "
        f"rows_per_shard 512), joined to a running local Ray; peak RSS is the driver process's `ru_maxrss`. "
        f"{res['machine']}.\n\n"
    )
    md.write(
        "| source rows | cached rows | shards | driver peak RSS (MB) | build s |\n|---|---|---|---|---|\n"
    )
    for r in rows:
        md.write(
            f"| {r['source_rows']} | {r['cached_rows']} | {r['shards']} | {r['driver_peak_rss_mb']} | {r['seconds']} |\n"
        )
    md.write(
        f"\nRatio 4N / N: **{res['ratio_4n_over_n']}x** (goal <= 1.2: {'met' if res['met'] else 'missed'}).\n"
    )
    md.write(
        "\nThe driver plans from Parquet footers (no ids), holds object references and per-shard entries only; "
        "ids are deduplicated by Ray tasks and every row is written by a worker. Most of the driver's RSS is "
        "the interpreter with torch, transformers, Ray and the planner's model loads.\n"
    )
    (out_dir / "cache_build_rss.md").write_text(md.getvalue())
    print(md.getvalue())
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--bare-only":  # the bare loop's own process
        cfg = load_build_config(sys.argv[2])
        loop_s = bare_loop(cfg, pq.read_table(sys.argv[3]).to_pylist(), Path(sys.argv[4]))
        print(json.dumps({"loop_s": loop_s}))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--starter", default=None, help="starter dir (default /tmp/starter_default, else micro)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N source rows")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--replicate", type=int, default=1, help="tile the rows K times (new ids) for a larger set"
    )
    p.add_argument("--rss", type=int, metavar="N", help="only the driver-memory benchmark: N and 4N rows")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    starter = Path(args.starter or "/tmp/starter_default")
    if not (starter / "summary.json").exists():
        from lidit.starter import build_starter

        starter = Path(tempfile.gettempdir()) / "starter_micro_bench"
        print(f"no default starter set; using micro at {starter}", file=sys.stderr)
        build_starter(starter, preset="micro", progress=False)
    if args.rss:
        return rss_benchmark(starter, args.rss, Path(args.out))
    work = Path(tempfile.mkdtemp(prefix="cache_bench_"))
    os.environ["LIDIT_HOME"] = str(work / "home")
    src = work / "src.parquet"
    table = pq.read_table(starter / "data" / "train")
    if args.limit:
        table = table.slice(0, args.limit)
    if args.replicate > 1:
        ids = table.column("id").to_pylist()
        parts = [
            table.set_column(0, "id", pa.array([f"{i}-r{k}" for i in ids])) for k in range(args.replicate)
        ]
        table = pa.concat_tables(parts)
    pq.write_table(table, src)
    rows = table.to_pylist()
    n = len(rows)

    overrides = [f"vae={starter / 'vae'}", "mlflow=false", "progress=false"]
    cfg_path = ROOT / "configs" / "starter" / "cache.yaml"
    cfg = load_build_config(cfg_path, overrides, sources=[str(src)], output=str(work / "cache"))
    cfg.encoders = [e.model_copy(update={"path": str(starter / Path(e.path).name)}) for e in cfg.encoders]

    import ray

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    cfg.ray.address = ray.get_runtime_context().gcs_address  # the pipeline process joins this cluster
    cfg_file = work / "cache.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    results: dict[str, list[float]] = {
        "bare_s": [],
        "pipeline_s": [],
        "bare_steady_rows_per_s": [],
        "pipeline_steady_rows_per_s": [],
    }
    summary = None
    # Both sides run as fresh processes (interpreter + imports + model loads + work), so neither gets
    # its imports for free; the Ray cluster is already running, as it would be on a real cluster.
    for r in range(args.repeats):
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            __file__,
            "--bare-only",
            str(cfg_file),
            str(src),
            str(work / f"bare{r}.parquet"),
        ]
        bare_out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results["bare_s"].append(time.perf_counter() - t0)
        results["bare_steady_rows_per_s"].append(n / json.loads(bare_out.strip().splitlines()[-1])["loop_s"])
        shutil.rmtree(work / "cache", ignore_errors=True)
        t0 = time.perf_counter()
        summary = run_build(cfg_file)
        results["pipeline_s"].append(time.perf_counter() - t0)
        results["pipeline_steady_rows_per_s"].append(summary["timing"].get("steady_rows_per_s", float("nan")))
        print(
            f"repeat {r}: bare {results['bare_s'][-1]:.1f}s pipeline {results['pipeline_s'][-1]:.1f}s",
            file=sys.stderr,
        )
    ray.shutdown()

    reader = CacheReader(str(work / "cache"))
    raw_padded, pq_padded = padded_fp32_bytes(reader, work / "padded.parquet")
    bare_s, pipe_s = min(results["bare_s"]), min(results["pipeline_s"])
    res = {
        "starter": str(starter),
        "rows": n,
        "cached_rows": summary["rows"],
        "bare_loop_s": round(bare_s, 2),
        "pipeline_s": round(pipe_s, 2),
        "bare_samples_per_s": round(n / bare_s, 2),
        "pipeline_samples_per_s": round(n / pipe_s, 2),
        "speed_ratio": round(bare_s / pipe_s, 3),
        "bare_steady_samples_per_s": round(max(results["bare_steady_rows_per_s"]), 2),
        "pipeline_steady_samples_per_s": round(max(results["pipeline_steady_rows_per_s"]), 2),
        "steady_speed_ratio": round(
            max(results["pipeline_steady_rows_per_s"]) / max(results["bare_steady_rows_per_s"]), 3
        ),
        "bytes_per_sample": round(summary["bytes_per_sample"], 1),
        "padded_fp32_raw_bytes_per_sample": round(raw_padded, 1),
        "padded_fp32_parquet_bytes_per_sample": round(pq_padded, 1),
        "bytes_ratio_vs_raw": round(summary["bytes_per_sample"] / raw_padded, 3),
        "bytes_ratio_vs_parquet": round(summary["bytes_per_sample"] / pq_padded, 3),
        "all_runs": results,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f} at end",
        "config": {
            "vae_stage": cfg.vae_stage.model_dump(),
            "encoder_stage": cfg.encoder_stage.model_dump(),
            "decode": cfg.decode.model_dump(),
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_build.json").write_text(json.dumps(res, indent=1))
    md = io.StringIO()
    md.write("# Cache build benchmark\n\n")
    md.write(f"Data: {n} starter rows from `{starter}`; {res['machine']}.\n\n")
    md.write("| metric | value | goal |\n|---|---|---|\n")
    md.write(f"| bare single-process loop | {res['bare_samples_per_s']} samples/s ({bare_s:.1f} s) | |\n")
    md.write(
        f"| Ray pipeline (python -m pipelines.build) | {res['pipeline_samples_per_s']} samples/s ({pipe_s:.1f} s) | |\n"
    )
    md.write(f"| pipeline / bare speed, end to end | {res['speed_ratio']}x | >= 0.75x |\n")
    md.write(
        f"| bare loop, steady state (models loaded) | {res['bare_steady_samples_per_s']} samples/s | |\n"
    )
    md.write(
        f"| pipeline, steady state (after the first shard) | {res['pipeline_steady_samples_per_s']} samples/s | |\n"
    )
    md.write(f"| pipeline / bare speed, steady state | {res['steady_speed_ratio']}x | >= 0.9x |\n")
    md.write(f"| cache bytes/sample | {res['bytes_per_sample']} | |\n")
    md.write(f"| padded fp32 bytes/sample (raw tensors) | {res['padded_fp32_raw_bytes_per_sample']} | |\n")
    md.write(
        f"| padded fp32 bytes/sample (Parquet, zstd) | {res['padded_fp32_parquet_bytes_per_sample']} | |\n"
    )
    md.write(f"| ratio vs padded fp32 raw | {res['bytes_ratio_vs_raw']}x | <= 0.25x |\n")
    md.write(f"| ratio vs padded fp32 Parquet | {res['bytes_ratio_vs_parquet']}x | |\n")
    md.write(NOTES)
    (out / "cache_build.md").write_text(md.getvalue())
    print(md.getvalue())
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
