"""Build or update a feature cache on Ray: `python -m pipelines.build CONFIG.yaml [--set k=v] [--json]`.

Flow: plan on the driver (`pipelines.plan`) -> per-unit decode/VAE/encoder/write on Ray workers, which write the
shards (`pipelines.execute`) -> manifest commit, last (`pipelines.commit`) -> MLflow record (`pipelines.tracking`).
This module is the entry point and the one function that strings those together.

Exit codes of `python -m pipelines.build`: 0 done; 2 config error (one line); 1 operational failure (one line:
a concurrent commit won, storage unreachable); a bug keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import Counter
from typing import Any

from cluster import ensure_ray
from lidit.cache import contract as C
from lidit.cache.storage import open_location
from lidit.config import ConfigError
from pipelines.args import add_build_arguments
from pipelines.commit import CommitConflictError, assemble_manifest, commit_manifest, is_new_content
from pipelines.config import CacheBuildConfig, load_build_config
from pipelines.plan import image_settings, plan_build
from pipelines.prefix import encoder_entry
from pipelines.tasks import ShardResult, UnitTask


class InjectedFailure(RuntimeError):
    """Raised by the `fail_after_shards` testing hook."""


def _progress(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"[cache] {msg}", file=sys.stderr, flush=True)


class _RaySession:
    """Ray, started or joined on first need (a rebuild that finds nothing to do never starts it)."""

    def __init__(self, cfg: CacheBuildConfig) -> None:
        self.cfg, self.started = cfg, None

    def up(self) -> None:
        if self.started is None:  # the driver prints progress; worker output stays in Ray's logs
            c = self.cfg.ray
            self.started = ensure_ray(c.address, c.num_cpus, c.object_store_mb, log_to_driver=False)

    def down(self) -> None:
        if self.started:
            import ray

            ray.shutdown()


def build_cache(cfg: CacheBuildConfig) -> dict[str, Any]:
    """Run a build; returns the summary (what `--json` prints). Commits a new version only if content changed."""
    session = _RaySession(cfg)
    try:
        return _build(cfg, session)
    finally:
        session.down()


def _build(cfg: CacheBuildConfig, session: _RaySession) -> dict[str, Any]:
    from pipelines.dedupe import find_duplicates  # these import Ray
    from pipelines.execute import run_units
    from pipelines.models import describe_models

    def find(ranges):
        _progress(cfg.progress, f"scanning ids of {len(ranges)} row ranges for duplicates")
        return find_duplicates(ranges, cfg.storage_options, cfg.decode.num_cpus)

    t0 = time.perf_counter()
    out = open_location(cfg.output, cfg.storage_options)
    _progress(cfg.progress, f"planning {out.uri}")
    session.up()  # the models are described by Ray tasks, where they are mounted
    vae, encoders = describe_models(cfg, image_settings(cfg))
    plan = plan_build(cfg, out, vae, encoders, find)
    entries: dict[str, C.ShardEntry] = {}
    computed: Counter = Counter({g: 0 for g in plan.spec.groups})
    task_names = {t.name for t in plan.tasks}
    for name in plan.names:  # complete shards from earlier builds (finished or killed)
        if name not in task_names:
            entries[name] = C.ShardEntry.model_validate_json(out.read_bytes(out.join(C.sidecar_name(name))))
    _progress(
        cfg.progress,
        f"{len(plan.names)} units: {len(entries)} reused as is, {len(plan.tasks)} to compute "
        f"(stages: {', '.join(sorted(plan.stages_needed)) or 'none'})",
    )

    def on_shard(task: UnitTask, result: ShardResult, stats) -> None:
        entries[task.name] = result.entry
        computed.update(result.computed)
        rate = stats.rows / max(time.perf_counter() - t_run, 1e-9)
        _progress(
            cfg.progress,
            f"shard {stats.shards}/{len(plan.tasks)}: {result.entry.rows} rows, "
            f"{result.entry.quarantine_rows} quarantined ({rate:.1f} source rows/s)",
        )
        if cfg.fail_after_shards is not None and stats.shards >= cfg.fail_after_shards:
            raise InjectedFailure(f"injected failure after {stats.shards} shards (fail_after_shards)")

    timing: dict[str, float] = {}
    if plan.tasks:
        # Driver prints the per-shard progress; worker output stays in Ray's logs.
        started_ray = ensure_ray(
            cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_mb, log_to_driver=False
        )
        try:
            t_run = time.perf_counter()
            stats = run_units(cfg, plan.spec, plan.tasks, plan.encoders, on_shard)
            if stats.steady_rows_per_s is not None:
                timing = {
                    "first_shard_s": round(t_run - t0 + (stats.first_shard_s or 0.0), 2),
                    "steady_rows_per_s": round(stats.steady_rows_per_s, 2),
                }
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    missing = [n for n in plan.names if n not in entries]
    if missing:
        raise RuntimeError(f"internal error: build ended with {len(missing)} incomplete units: {missing[:3]}")
    shards = [entries[n] for n in plan.names]
    completed = [encoder_entry(out.uri, cfg.storage_options, e) for e in plan.encoders]
    manifest = assemble_manifest(plan, shards, [e for e, _ in completed])
    new_version = is_new_content(plan, manifest)
    rows = manifest.rows
    total_bytes = sum(s.bytes for s in shards) + sum(size for _, size in completed)
    summary: dict[str, Any] = {
        "uri": out.uri,
        "version": manifest.version if new_version else plan.previous.version,
        "new_version": new_version,
        "rows": rows,
        "shards": len(shards),
        "shards_written": len(plan.tasks),
        "shards_reused": len(plan.names) - len(plan.tasks),
        "quarantined": manifest.quarantine_counts,
        "quarantined_total": sum(manifest.quarantine_counts.values()),
        "computed": dict(computed),
        "reused": {g: rows - computed[g] for g in plan.spec.groups},
        "bytes": total_bytes,
        "bytes_per_sample": total_bytes / rows if rows else 0.0,
        "seconds": round(time.perf_counter() - t0, 3),
        "timing": timing,
        # this process's peak so far (in-process callers include their own); O(shards) by design
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "fingerprints": {"vae": plan.vae.fingerprint} | {e.name: e.fingerprint for e in plan.encoders},
        "sources": [s.uri for s in plan.sources],
    }
    if new_version:
        manifest.build = {k: summary[k] for k in ("computed", "reused", "seconds", "shards_written")}
        commit_manifest(out, manifest)
    if cfg.mlflow:
        from pipelines.tracking import log_to_mlflow

        summary["mlflow_run_id"] = log_to_mlflow(cfg, summary, manifest)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """Human summary of a build."""
    lines = [
        f"cache {s['uri']} version {s['version']}{'' if s['new_version'] else ' (unchanged)'}",
        f"  rows {s['rows']} in {s['shards']} shards ({s['shards_written']} written, {s['shards_reused']} reused)",
        f"  quarantined {s['quarantined_total']}"
        + (": " + ", ".join(f"{k} {v}" for k, v in s["quarantined"].items()) if s["quarantined"] else ""),
    ]
    for g in s["computed"]:
        lines.append(f"  {g:<12} computed {s['computed'][g]:>7}  reused {s['reused'][g]:>7}")
    lines.append(f"  {s['bytes_per_sample']:.0f} bytes/sample, {s['seconds']:.1f} s")
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    """What `lidit cache build` and `python -m pipelines.build` run after parsing."""
    cfg = load_build_config(args.config, list(args.set), output=args.output)
    if args.source:
        base = cfg.sources[0].model_dump(exclude={"uri", "format"})
        cfg.sources = [{"uri": s, "format": args.source_format, **base} for s in args.source]
    summary = build_cache(cfg)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.build", description=__doc__.splitlines()[0])
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except ConfigError as exc:
        print(f"pipelines.build: config error: {exc}", file=sys.stderr)
        return 2
    except CommitConflictError as exc:
        print(f"pipelines.build: {exc}; {exc.hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
