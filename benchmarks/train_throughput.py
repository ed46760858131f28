"""Training throughput from the feature cache vs encoding online, and cache-loader vs step throughput.

    python benchmarks/train_throughput.py [--cache URI] [--steps 15] [--batch 32] [--preset tiny]

Writes benchmarks/results/train_throughput.{md,json}. Single process, one thread budget for all paths, so the
numbers compare the work per sample (the multi-worker FSDP path adds collectives on top of the same step).

- cache:   cache rows -> batch_to_training_inputs -> generator train step (what `lidit train` does)
- online:  source PNG bytes -> decode -> VAE encode -> both LLMs -> train step (no cache)
- loader:  Ray Data read of the cache shards -> batch_to_training_inputs, no model (must beat the step >= 5x)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from lidit.cache.reader import CacheReader, batch_to_training_inputs
from lidit.config import lidit_home
from lidit.encoder import EncoderConfig, PromptEncoder
from lidit.generator import GeneratorConfig, LiDiTGenerator, TextBranchSpec
from lidit.objectives import training_targets
from lidit.pipeline import vae_to_latents

RESULTS = Path(__file__).resolve().parent / "results"


def train_step(model: LiDiTGenerator, optim: torch.optim.Optimizer, latents, texts, g) -> float:
    targets = training_targets("epsilon", latents, g)
    loss = F.mse_loss(model(targets.noisy, targets.timesteps, texts), targets.target)
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    return loss.item()


def timed(fn, n: int, warmup: int = 2) -> float:
    """Seconds per call, after warmup calls."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", default=str(lidit_home() / "cache"))
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    reader = CacheReader(args.cache)
    m = reader.manifest
    table = reader.to_arrow()
    bucket = table["bucket"][0].as_py()
    first_bucket = table.filter(pc.equal(table["bucket"], bucket))
    rows = first_bucket.slice(0, args.batch)
    if rows.num_rows < args.batch:
        raise SystemExit(f"need {args.batch} rows of one bucket, cache has {rows.num_rows}")
    branches = [TextBranchSpec(name=e.name, hidden_size=e.hidden_size) for e in m.encoders]
    model = LiDiTGenerator(
        GeneratorConfig.from_preset(args.preset, branches, latent_channels=m.vae.latent_channels)
    )
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    # cache path: decode the batch from its stored bytes every step, as the training loop does
    def cache_step() -> None:
        latents, texts, _ = batch_to_training_inputs(rows, reader)
        train_step(model, optim, latents, texts, g)

    # online path: the same rows encoded from their source images and captions every step
    from diffusers import AutoencoderKL
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(m.vae.path).eval()
    encoders = [PromptEncoder(EncoderConfig.model_validate(e.config)) for e in m.encoders]
    ids = set(rows["id"].to_pylist())
    if any(src.format != "parquet" for src in m.sources):
        raise SystemExit("online comparison needs Parquet sources")
    source = pa.concat_tables(
        [pq.read_table(src.uri, columns=["id", "image", "caption"]) for src in m.sources]
    )
    source = source.filter(pc.is_in(source["id"], value_set=pa.array(sorted(ids))))
    images, captions = source["image"].to_pylist(), source["caption"].to_pylist()

    def online_step() -> None:
        with torch.no_grad():
            pix = torch.stack(
                [
                    torch.from_numpy(np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32))
                    .permute(2, 0, 1)
                    .div(127.5)
                    .sub(1)
                    for b in images
                ]
            )
            latents = vae_to_latents(vae.encode(pix).latent_dist.mean, vae)
            texts = [e.features(captions, truncate=True) for e in encoders]
        train_step(model, optim, latents, texts, g)

    # loader path: Ray Data over the shards, decoded to tensors, no model
    import ray

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    try:
        ds = ray.data.read_parquet(reader.shard_uris(), filesystem=reader.filesystem)
        ds = ds.filter(lambda r: r["bucket"] == bucket).materialize()
        n_loaded, t0 = 0, time.perf_counter()
        for _ in range(3):
            for batch in ds.iter_batches(batch_size=args.batch, batch_format="numpy", drop_last=True):
                latents, _, _ = batch_to_training_inputs(batch, reader)
                n_loaded += latents.shape[0]
        loader_sps = n_loaded / (time.perf_counter() - t0)
    finally:
        ray.shutdown()

    step_s = timed(cache_step, args.steps)
    online_s = timed(online_step, args.steps)
    cache_sps, online_sps = args.batch / step_s, args.batch / online_s
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads",
        "preset": args.preset,
        "batch": args.batch,
        "cache": reader.uri,
        "train_from_cache_samples_per_s": round(cache_sps, 1),
        "train_online_samples_per_s": round(online_sps, 1),
        "cache_speedup": round(cache_sps / online_sps, 2),
        "loader_samples_per_s": round(loader_sps, 1),
        "loader_over_step": round(loader_sps / cache_sps, 1),
        "goal_loader_over_step": ">= 5x",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(result, indent=2))
    md = [
        "# Training throughput (single process)",
        "",
        f"Command: `python benchmarks/train_throughput.py --steps {args.steps} --batch {args.batch} --preset {args.preset}`",
        f"Machine: {result['machine']}",
        "",
        "| path | samples/s |",
        "|---|---|",
        f"| train step from the cache | {result['train_from_cache_samples_per_s']} |",
        f"| train step encoding online (PNG decode + VAE + 2 LLMs) | {result['train_online_samples_per_s']} |",
        f"| cache loader alone (Ray Data -> tensors) | {result['loader_samples_per_s']} |",
        "",
        f"Cache vs online: {result['cache_speedup']}x. Loader vs step: {result['loader_over_step']}x (goal >= 5x).",
    ]
    (RESULTS / "train_throughput.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
