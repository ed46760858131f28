"""Run a plan's unit tasks on Ray: decode task -> VAE actor -> one actor per encoder -> write task, per unit.

Each unit's rows move worker to worker through Ray's object store and are written by a worker straight to the
cache location; the driver holds object references and gets back only each shard's `ShardResult`. A unit runs
only the stages its task needs. In-flight units are bounded (decode tasks by `decode.size`, all units by the
pool sizes) so the object store holds a few units at a time whatever the source size.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lidit.cache import contract as C
from pipelines.config import CacheBuildConfig, StageResources
from pipelines.models import EncoderInfo
from pipelines.shard import write_shard
from pipelines.stages import EncoderStage, VaeStage, prepare_unit
from pipelines.tasks import BuildSpec, ShardResult, UnitTask


@dataclass
class RunStats:
    """Timing of a run: seconds to the first shard and the steady rate after it (`steady_rate`)."""

    shards: int = 0
    rows: int = 0
    first_shard_s: float | None = None
    steady_rows_per_s: float | None = None


def steady_rate(completions: list[tuple[float, int]]) -> float | None:
    """Rows/s of the pipeline once it is running, from `(time, rows so far)` at each shard's completion.

    The least-squares slope of rows over time: start-up before the first shard does not count, and neither
    does the head start of the units in flight when the first shard lands (they finish in a burst). A rate
    taken from the first to the last shard counts those rows as made after the first one and overstates the
    rate, by up to the number of units in flight. None with fewer than three completions.
    """
    if len(completions) < 3:
        return None
    n = len(completions)
    t_mean = sum(t for t, _ in completions) / n
    r_mean = sum(r for _, r in completions) / n
    spread = sum((t - t_mean) ** 2 for t, _ in completions)
    if spread <= 0:
        return None
    return sum((t - t_mean) * (r - r_mean) for t, r in completions) / spread


class _Pool:
    """Actors of one stage; each unit goes to the actor with the fewest units in flight."""

    def __init__(self, cls: type, res: StageResources, kwargs: dict[str, Any]) -> None:
        import ray

        device = "cuda" if res.num_gpus > 0 else "cpu"
        remote = ray.remote(cls).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus or None)
        kwargs = {**kwargs, "device": device, "threads": res.threads, "batch_size": res.batch_size}
        self.actors = [remote.remote(**kwargs) for _ in range(res.size)]
        self.load = [0] * res.size

    def submit(self, ref: Any) -> tuple[Any, int]:
        i = min(range(len(self.actors)), key=self.load.__getitem__)
        self.load[i] += 1
        return self.actors[i].run.remote(ref), i

    def done(self, i: int) -> None:
        self.load[i] -= 1

    def kill(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def run_units(
    cfg: CacheBuildConfig,
    spec: BuildSpec,
    tasks: list[UnitTask],
    encoders: list[EncoderInfo],
    on_shard: Callable[[UnitTask, ShardResult, RunStats], None],
) -> RunStats:
    """Compute and write every task's shard; `on_shard` is called on the driver as each one lands."""
    import ray

    stats = RunStats()
    if not tasks:
        return stats
    needed = {g for t in tasks for g in t.need}
    pools: dict[str, _Pool] = {}
    if C.LATENT_GROUP in needed:
        pools[C.LATENT_GROUP] = _Pool(
            VaeStage, cfg.vae_stage, {"vae_path": cfg.vae, "dtype": cfg.latent_dtype}
        )
    for ec, info in zip(cfg.encoders, encoders, strict=True):
        if ec.name in needed:
            kwargs = {
                "encoder_config": ec.model_dump(mode="json"),
                "dtype": cfg.states_dtype,
                "fingerprint": info.fingerprint,
                "prefix": (spec.output_uri, spec.storage_options, info.prefix_file),
                "layout": spec.layout,
                "negatives": spec.negatives,
            }
            pools[ec.name] = _Pool(EncoderStage, cfg.encoder_stage, kwargs)
    prepare = ray.remote(prepare_unit).options(num_cpus=cfg.decode.num_cpus)
    write = ray.remote(write_shard).options(num_cpus=cfg.decode.num_cpus)
    spec_ref = ray.put(spec)
    # Enough units in flight to keep every actor busy while the next unit decodes; no more.
    max_units = cfg.decode.size + sum(len(p.actors) for p in pools.values())
    pending = deque(tasks)
    decoding: set[Any] = set()
    writing: dict[Any, tuple[UnitTask, list[tuple[str, int]]]] = {}
    t_run = time.perf_counter()
    completions: list[tuple[float, int]] = []
    try:
        while pending or writing:
            while pending and len(decoding) < cfg.decode.size and len(writing) < max_units:
                task = pending.popleft()
                ref = prepare.remote(spec_ref, task)
                decoding.add(ref)
                slots = []
                for group in spec.groups:  # latents first, then encoders in manifest order
                    if group in task.need:
                        ref, i = pools[group].submit(ref)
                        slots.append((group, i))
                writing[write.remote(spec_ref, task, ref)] = (task, slots)
            # fetch_local=False: a ready decode result stays on its worker; only results come here
            ready, _ = ray.wait([*decoding, *writing], num_returns=1, fetch_local=False)
            for ref in ready:
                if ref in decoding:
                    decoding.discard(ref)
                    continue
                task, slots = writing.pop(ref)
                for group, i in slots:
                    pools[group].done(i)
                result: ShardResult = ray.get(ref)
                stats.shards += 1
                stats.rows += task.rows
                completions.append((time.perf_counter(), stats.rows))
                if stats.shards == 1:  # steady state excludes worker start-up and the first unit
                    stats.first_shard_s = completions[0][0] - t_run
                on_shard(task, result, stats)
        stats.steady_rows_per_s = steady_rate(completions)
        return stats
    finally:
        _stop([*decoding, *writing], pools)


def _stop(refs: list[Any], pools: dict[str, _Pool]) -> None:
    """Cancel what is still in flight (after a failure) and release the actors."""
    import ray

    for ref in refs:
        ray.cancel(ref, recursive=True)
    if refs:  # let cancelled writers settle, so no shard lands after the build returned
        ray.wait(refs, num_returns=len(refs), timeout=30)
    for pool in pools.values():
        pool.kill()
