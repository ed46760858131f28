"""Build or update a feature cache with Ray Data: `python -m pipelines.build CONFIG.yaml [--set k=v] [--json]`.

Flow: plan on the driver (list sources, fingerprint encoders/VAE/units, decide per unit what to reuse) ->
Ray Data: read+validate+bucket tasks -> VAE actor pool -> one actor pool per encoder -> the driver writes each
unit's shard as soon as all its rows arrived (atomic), then commits a manifest (last).

Reuse, in order: a shard with the same unit and group fingerprints (from any earlier build, finished or
killed) is taken as is; otherwise the unit's shard in the latest version lends the groups whose fingerprint
still matches (looked up by id) and only stale groups are computed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from safetensors.torch import save as save_safetensors

from cluster import ensure_ray
from lidit.cache import contract as C
from lidit.cache.reader import list_versions, load_manifest
from lidit.cache.storage import Location, open_location
from lidit.config import ConfigError, dump_config
from lidit.encoder import PromptEncoder
from lidit.fingerprint import hash_bytes, hash_json, hash_model_dir
from pipelines.args import add_build_arguments
from pipelines.config import CacheBuildConfig, load_build_config
from pipelines.sources import SourceFile, discover
from pipelines.stages import (
    COL_DETAIL,
    COL_REASON,
    COL_UNIT,
    COL_UNIT_ROWS,
    EncoderStage,
    VaeStage,
    new_column,
    prepare_units,
)


class InjectedFailure(RuntimeError):
    """Raised by the `fail_after_shards` testing hook."""


@dataclass
class Plan:
    """What a build will do: the target manifest's parts and the unit tasks that need computing."""

    sources: list[C.SourceEntry]
    vae: C.VaeEntry
    encoders: list[C.EncoderEntry]
    prefixes: dict[str, bytes]  # encoder -> safetensors bytes of its prefix states
    groups: dict[str, str]  # column group -> fingerprint
    units: list[dict[str, Any]]  # every unit in output order: {"unit", "name", "source", "entry"}
    tasks: list[dict[str, Any]]  # units to compute
    previous: C.Manifest | None
    stages_needed: set[str] = field(default_factory=set)


def _vae_entry(cfg: CacheBuildConfig, image: C.ImageSettings) -> C.VaeEntry:
    from diffusers import AutoencoderKL

    if not os.path.isdir(cfg.vae):
        raise FileNotFoundError(f"VAE directory not found: {cfg.vae}")
    vcfg = AutoencoderKL.load_config(cfg.vae)
    fp = hash_model_dir(cfg.vae)[:16]
    return C.VaeEntry(
        path=cfg.vae,
        fingerprint=fp,
        group_fingerprint=hash_json([fp, cfg.latent_dtype, image.model_dump(mode="json")])[:16],
        latent_channels=int(vcfg["latent_channels"]),
        scale=2 ** (len(vcfg["block_out_channels"]) - 1),
        scaling_factor=float(vcfg.get("scaling_factor") or 1.0),
        shift_factor=float(vcfg.get("shift_factor") or 0.0),
        latents_mean=vcfg.get("latents_mean"),
        latents_std=vcfg.get("latents_std"),
        dtype=cfg.latent_dtype,
    )


def _encoder_entries(cfg: CacheBuildConfig) -> tuple[list[C.EncoderEntry], dict[str, bytes]]:
    entries, prefixes = [], {}
    for ec in cfg.encoders:
        enc = PromptEncoder(ec)  # loads the LM once on the driver: fingerprint + shared prefix states
        prefix = enc.prefix_states.detach().to("cpu", C.torch_dtype(cfg.states_dtype)).contiguous()
        data = save_safetensors({C.PREFIX_TENSOR: prefix}, metadata={"encoder": ec.name})
        fp = enc.fingerprint
        entries.append(
            C.EncoderEntry(
                name=ec.name,
                config=ec.model_dump(mode="json"),
                fingerprint=fp,
                group_fingerprint=hash_json([fp, cfg.states_dtype])[:16],
                hidden_size=enc.hidden_size,
                prefix_len=enc.prefix_len,
                dtype=cfg.states_dtype,
                prefix_file=f"{C.PREFIX_DIR}/{ec.name}-{fp}.safetensors",
                prefix_sha256=hash_bytes(data),
            )
        )
        prefixes[ec.name] = data
        del enc
    return entries, prefixes


def plan_build(cfg: CacheBuildConfig, out: Location) -> Plan:
    """Discover sources, fingerprint everything, and decide per unit: reuse, partially reuse, or compute."""
    image = C.ImageSettings(
        resolution=cfg.resolution,
        buckets=cfg.bucket_list(),
        max_image_pixels=cfg.max_image_pixels,
        min_image_side=cfg.min_image_side,
    )
    vae = _vae_entry(cfg, image)
    encoders, prefixes = _encoder_entries(cfg)
    groups = {C.LATENT_GROUP: vae.group_fingerprint} | {e.name: e.group_fingerprint for e in encoders}
    groups_key = hash_json(groups)[:12]
    previous = load_manifest(out)
    prev_by_unit = {s.unit: s for s in previous.shards} if previous else {}
    done = set()
    shard_dir = out.join(C.SHARD_DIR)
    if out.exists(shard_dir):
        done = {p.rsplit("/", 1)[-1] for p in out.fs.ls(shard_dir, detail=False) if p.endswith(".json")}

    files: list[SourceFile] = []
    for src in cfg.sources:
        files.extend(discover(src, cfg.storage_options))
    seen: set[str] = set()
    units, tasks, sources = [], [], []
    enc_meta = [{"name": e.name, "path": e.path, "max_length": e.max_length} for e in cfg.encoders]
    stages: set[str] = set()
    for sf in files:
        sources.append(C.SourceEntry(uri=sf.uri, format=sf.format, fingerprint=sf.fingerprint, rows=sf.rows))
        dup = []
        for i, rid in enumerate(sf.ids):  # first occurrence wins, in source order
            if rid is None:
                continue
            if rid in seen:
                dup.append(i)
            seen.add(rid)
        for start in range(0, sf.rows, cfg.rows_per_shard):
            stop = min(sf.rows, start + cfg.rows_per_shard)
            udup = [i - start for i in dup if start <= i < stop]
            content = sf.fingerprint if sf.format == "parquet" else [f[2] for f in sf.files[start:stop]]
            unit = hash_json(
                {
                    "contract": C.CONTRACT_VERSION,
                    "uri": sf.uri,
                    "content": content,
                    "range": [start, stop],
                    "dup": udup,
                    "source": sf.source.model_dump(mode="json", exclude={"uri"}),
                    "image": image.model_dump(mode="json"),
                }
            )[:24]
            name = f"{unit}-{groups_key}"
            units.append({"unit": unit, "name": name, "source": sf.uri})
            if f"{name}.json" in done:
                continue
            prev = prev_by_unit.get(unit)
            reuse = [g for g in groups if prev is not None and prev.groups.get(g) == groups[g]]
            need = [g for g in groups if g not in reuse]
            if prev is not None and prev.quarantine_counts.get("caption_too_long"):
                need = list(groups)  # rows may become valid and need every group
            stages.update(need)
            tasks.append(
                {
                    "unit": unit,
                    "name": name,
                    "source_uri": sf.uri,
                    "format": sf.format,
                    "path": sf.path,
                    "source_cfg": sf.source.model_dump(mode="json"),
                    "start": start,
                    "stop": stop,
                    "files": [[f[0], f[1]] for f in sf.files[start:stop]],
                    "ids": sf.ids[start:stop],
                    "dup": udup,
                    "groups": list(groups),
                    "reuse_groups": reuse,
                    "reuse_path": out.join(prev.path) if prev is not None and reuse else None,
                    "output_uri": out.uri,
                    "encoders": enc_meta,
                    "image": image.model_dump(mode="json"),
                    "storage_options": cfg.storage_options,
                }
            )
    return Plan(sources, vae, encoders, prefixes, groups, units, tasks, previous, stages)


# ---- Ray ----


def build_dataset(cfg: CacheBuildConfig, plan: Plan):
    """The Ray Data pipeline over the plan's unit tasks (only the stages some unit needs)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the build prints its own per-shard progress
    items = [{"task": json.dumps(t)} for t in plan.tasks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # A bounded task pool: each new worker process pays the torch/transformers import, costly on small boxes.
    ds = ds.map_batches(
        prepare_units,
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=min(cfg.decode.size, len(items))),
        num_cpus=cfg.decode.num_cpus,
    )

    def actor_stage(ds, cls, res, kwargs):
        device = "cuda" if res.num_gpus > 0 else "cpu"
        return ds.map_batches(
            cls,
            fn_constructor_kwargs={**kwargs, "device": device, "threads": res.threads},
            batch_size=res.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=res.size),
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus or None,
        )

    if C.LATENT_GROUP in plan.stages_needed:
        ds = actor_stage(ds, VaeStage, cfg.vae_stage, {"vae_path": cfg.vae, "dtype": cfg.latent_dtype})
    for ec in cfg.encoders:
        if ec.name in plan.stages_needed:
            kwargs = {"encoder_config": ec.model_dump(mode="json"), "dtype": cfg.states_dtype}
            ds = actor_stage(ds, EncoderStage, cfg.encoder_stage, kwargs)
    return ds


# ---- writing ----


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    pq.write_table(table, buf, compression="zstd", use_dictionary=strings, row_group_size=4096)
    return buf.getvalue()


def write_unit(
    out: Location, name: str, source: str, groups: dict[str, str], table: pa.Table, encoders: list[str]
) -> tuple[C.ShardEntry, Counter]:
    """Write one unit: quarantine file, shard (both atomic), then the sidecar that marks it complete."""
    table = table.sort_by(C.COL_SOURCE_ROW)
    bad_mask = pc.is_valid(table.column(COL_REASON))
    good, bad = table.filter(pc.invert(bad_mask)), table.filter(bad_mask)
    schema = C.shard_schema(encoders)
    for col in schema.names:
        if good.column(col).null_count:
            raise RuntimeError(f"internal error: unit {name}: column {col} not computed for some rows")
    shard = pa.Table.from_arrays(
        [good.column(c).cast(schema.field(c).type) for c in schema.names], schema=schema
    )
    quarantine = pa.Table.from_arrays(
        [bad.column(c) for c in (C.COL_ID, C.COL_SOURCE, C.COL_SOURCE_ROW)]
        + [bad.column(COL_REASON), bad.column(COL_DETAIL).fill_null("")],
        schema=C.QUARANTINE_SCHEMA,
    )
    q_path = f"{C.QUARANTINE_DIR}/{name}.parquet"
    out.write_bytes_atomic(out.join(q_path), _parquet_bytes(quarantine))
    data = _parquet_bytes(shard)
    s_path = f"{C.SHARD_DIR}/{name}.parquet"
    out.write_bytes_atomic(out.join(s_path), data)
    counts = Counter(bad.column(COL_REASON).to_pylist())
    new = Counter({g: int(pc.sum(good.column(new_column(g))).as_py() or 0) for g in groups})
    entry = C.ShardEntry(
        path=s_path,
        rows=shard.num_rows,
        bytes=len(data),
        sha256=hash_bytes(data),
        unit=name.split("-")[0],
        source=source,
        groups=groups,
        quarantine_path=q_path,
        quarantine_rows=quarantine.num_rows,
        quarantine_counts=dict(sorted(counts.items())),
    )
    out.write_bytes_atomic(out.join(f"{C.SHARD_DIR}/{name}.json"), entry.model_dump_json().encode())
    return entry, new


def _progress(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"[cache] {msg}", file=sys.stderr, flush=True)


def build_cache(cfg: CacheBuildConfig) -> dict[str, Any]:
    """Run a build; returns the summary (what `--json` prints). Commits a new version only if content changed."""
    t0 = time.perf_counter()
    out = open_location(cfg.output, cfg.storage_options)
    _progress(cfg.progress, f"planning {out.uri}")
    plan = plan_build(cfg, out)
    for e in plan.encoders:  # prefix files first: content-addressed, so rewriting is harmless
        path = out.join(e.prefix_file)
        if not out.exists(path):
            out.write_bytes_atomic(path, plan.prefixes[e.name])
    names = [e.name for e in plan.encoders]
    entries: dict[str, C.ShardEntry] = {}
    computed: Counter = Counter({g: 0 for g in plan.groups})
    task_names = {t["name"] for t in plan.tasks}
    for u in plan.units:  # complete shards from earlier builds (finished or killed)
        if u["name"] not in task_names:
            entries[u["name"]] = C.ShardEntry.model_validate_json(
                out.read_bytes(out.join(f"{C.SHARD_DIR}/{u['name']}.json"))
            )
    _progress(
        cfg.progress,
        f"{len(plan.units)} units: {len(entries)} reused as is, {len(plan.tasks)} to compute "
        f"(stages: {', '.join(sorted(plan.stages_needed)) or 'none'})",
    )
    started_ray = False
    timing: dict[str, float] = {}
    if plan.tasks:
        # Driver prints the per-shard progress; worker output stays in Ray's logs.
        started_ray = ensure_ray(
            cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_mb, log_to_driver=False
        )
        try:
            by_name = {t["name"]: t for t in plan.tasks}
            by_unit = {t["unit"]: t for t in plan.tasks}
            if len(by_unit) != len(plan.tasks):
                raise ValueError("two sources hold the same file: list each source file once")
            pending: dict[str, list[pa.Table]] = {}
            have: Counter = Counter()
            written = rows_done = 0
            t_run = time.perf_counter()
            for batch in build_dataset(cfg, plan).iter_batches(batch_format="pyarrow", batch_size=None):
                for unit in pc.unique(batch.column(COL_UNIT)).to_pylist():
                    part = batch.filter(pc.equal(batch.column(COL_UNIT), unit))
                    task = by_unit[unit]
                    pending.setdefault(unit, []).append(part)
                    have[unit] += part.num_rows
                    if have[unit] < part.column(COL_UNIT_ROWS)[0].as_py():
                        continue
                    table = pa.concat_tables(pending.pop(unit))
                    entry, new = write_unit(out, task["name"], task["source_uri"], plan.groups, table, names)
                    entries[task["name"]] = entry
                    computed.update(new)
                    written += 1
                    rows_done += table.num_rows
                    t_last = time.perf_counter()
                    if written == 1:  # steady-state throughput excludes worker start and the first block
                        t_first, first_rows = t_last, table.num_rows
                    rate = rows_done / max(time.perf_counter() - t_run, 1e-9)
                    _progress(
                        cfg.progress,
                        f"shard {written}/{len(by_name)}: {entry.rows} rows, {entry.quarantine_rows} quarantined "
                        f"({rate:.1f} source rows/s)",
                    )
                    if cfg.fail_after_shards is not None and written >= cfg.fail_after_shards:
                        raise InjectedFailure(f"injected failure after {written} shards (fail_after_shards)")
            if written > 1:
                steady = (rows_done - first_rows) / max(t_last - t_first, 1e-9)
                timing = {"first_shard_s": round(t_first - t0, 2), "steady_rows_per_s": round(steady, 2)}
            missing = [t["name"] for t in plan.tasks if t["name"] not in entries]
            if missing:
                raise RuntimeError(f"pipeline ended with {len(missing)} incomplete units: {missing[:3]}")
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    shards = [entries[u["name"]] for u in plan.units]
    rows = sum(s.rows for s in shards)
    qcounts: Counter = Counter()
    for s in shards:
        qcounts.update(s.quarantine_counts)
    reused = {g: rows - computed[g] for g in plan.groups}
    total_bytes = sum(s.bytes for s in shards) + sum(len(b) for b in plan.prefixes.values())
    manifest = C.Manifest(
        version=(plan.previous.version + 1) if plan.previous else 1,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        rows=rows,
        sources=plan.sources,
        image=C.ImageSettings(
            resolution=cfg.resolution,
            buckets=cfg.bucket_list(),
            max_image_pixels=cfg.max_image_pixels,
            min_image_side=cfg.min_image_side,
        ),
        vae=plan.vae,
        encoders=plan.encoders,
        shards=shards,
        quarantine_counts=dict(sorted(qcounts.items())),
    )
    new_version = plan.previous is None or plan.previous.content_key() != manifest.content_key()
    summary: dict[str, Any] = {
        "uri": out.uri,
        "version": manifest.version if new_version else plan.previous.version,
        "new_version": new_version,
        "rows": rows,
        "shards": len(shards),
        "shards_written": len(plan.tasks),
        "shards_reused": len(plan.units) - len(plan.tasks),
        "quarantined": dict(sorted(qcounts.items())),
        "quarantined_total": sum(qcounts.values()),
        "computed": dict(computed),
        "reused": reused,
        "bytes": total_bytes,
        "bytes_per_sample": total_bytes / rows if rows else 0.0,
        "seconds": round(time.perf_counter() - t0, 3),
        "timing": timing,
        "fingerprints": {"vae": plan.vae.fingerprint} | {e.name: e.fingerprint for e in plan.encoders},
        "sources": [s.uri for s in plan.sources],
    }
    if new_version:
        manifest.build = {k: summary[k] for k in ("computed", "reused", "seconds", "shards_written")}
        if list_versions(out) and max(list_versions(out)) >= manifest.version:
            raise RuntimeError(f"{out.uri}: version {manifest.version} was committed concurrently")
        out.write_bytes_atomic(
            out.join(C.manifest_name(manifest.version)), manifest.model_dump_json(indent=1).encode()
        )
    if cfg.mlflow:
        summary["mlflow_run_id"] = log_to_mlflow(cfg, summary, manifest)
    return summary


def log_to_mlflow(cfg: CacheBuildConfig, summary: dict[str, Any], manifest: C.Manifest) -> str | None:
    """One MLflow run per build: config, fingerprints, counts. Failures warn and never fail the build."""
    try:
        import mlflow

        from lidit.registry import configure_mlflow

        configure_mlflow(cfg.mlflow_experiment)
        with mlflow.start_run(run_name=f"cache-v{summary['version']}") as run:
            flat = _flatten(dump_config(cfg))
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items() if "storage_options" not in k})
            mlflow.set_tags(
                {"cache_uri": summary["uri"], "cache_version": str(summary["version"])}
                | {f"fingerprint.{k}": v for k, v in summary["fingerprints"].items()}
            )
            metrics = {
                "rows": summary["rows"],
                "quarantined": summary["quarantined_total"],
                "seconds": summary["seconds"],
                "bytes_per_sample": summary["bytes_per_sample"],
            }
            metrics |= {f"computed.{g}": v for g, v in summary["computed"].items()}
            metrics |= {f"reused.{g}": v for g, v in summary["reused"].items()}
            metrics |= {f"quarantined.{r}": v for r, v in summary["quarantined"].items()}
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            mlflow.log_dict(manifest.model_dump(mode="json"), "manifest.json")
            mlflow.log_dict(summary, "summary.json")
            return run.info.run_id
    except Exception as exc:  # tracking is a record of the build, not part of it
        print(f"[cache] warning: MLflow logging failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, item in enumerate(v):
                out.update(_flatten(item, f"{key}.{i}."))
        else:
            out[key] = v
    return out


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
    overrides = list(args.set)
    cfg = load_build_config(args.config, overrides, output=args.output)
    if args.source:
        base = cfg.sources[0].model_dump(exclude={"uri", "format"})
        cfg.sources = [{"uri": s, "format": args.source_format, **base} for s in args.source]
    try:
        summary = build_cache(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.build", description=__doc__.splitlines()[0])
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except ConfigError as exc:
        print(f"pipelines.build: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
