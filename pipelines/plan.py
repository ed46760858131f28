"""Plan a cache build on the driver: list sources, key the units, decide per unit what to reuse.

Reuse, in order: a shard with the same unit and group fingerprints (from any earlier build, finished or
killed) is taken as is; otherwise the unit's shard in the latest version lends the groups whose fingerprint
still matches (looked up by id) and only stale groups are computed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from lidit.cache import contract as C
from lidit.cache.reader import load_manifest
from lidit.cache.storage import Location
from lidit.config import ConfigError
from lidit.fingerprint import hash_json
from pipelines.config import CacheBuildConfig
from pipelines.models import EncoderInfo
from pipelines.sources import SourceFile, discover
from pipelines.tasks import BuildSpec, EncoderSpec, RowRange, UnitTask

FindDuplicates = Callable[[list[RowRange]], dict[int, list[int]]]


@dataclass
class Plan:
    """What a build will do: the target manifest's parts and the unit tasks that need computing."""

    spec: BuildSpec
    sources: list[C.SourceEntry]
    vae: C.VaeEntry
    encoders: list[EncoderInfo]  # manifest entries but the prefix, which the encoder actors write
    names: list[str]  # shard name of every unit, in output order
    tasks: list[UnitTask]  # units to compute
    previous: C.Manifest | None
    stages_needed: set[str] = field(default_factory=set)


def image_settings(cfg: CacheBuildConfig) -> C.ImageSettings:
    return C.ImageSettings(
        resolution=cfg.resolution,
        buckets=cfg.bucket_list(),
        max_image_pixels=cfg.max_image_pixels,
        min_image_side=cfg.min_image_side,
    )


def _complete_shards(out: Location) -> set[str]:
    """Names of the shards whose sidecar exists (complete, from any earlier build)."""
    shard_dir = out.join(C.SHARD_DIR)
    if not out.exists(shard_dir):
        return set()
    return {
        p.rsplit("/", 1)[-1][: -len(".json")]
        for p in out.fs.ls(shard_dir, detail=False)
        if p.endswith(".json")
    }


def _duplicates(
    out: Location, files: list[SourceFile], ranges: list[RowRange], find: FindDuplicates
) -> dict[int, list[int]]:
    """Duplicate rows per range: stored under the cache root by what decides them (every source file's content
    and id column, and the ranges), so an unchanged source is not scanned again; else found by `find`."""
    key = hash_json(
        [[f.uri, f.fingerprint, f.source.id_column] for f in files] + [[r.start, r.stop] for r in ranges]
    )[:24]
    path = out.join(C.PLAN_DIR, f"dedupe-{key}.json")
    if out.exists(path):
        return {int(k): v for k, v in json.loads(out.read_bytes(path)).items()}
    dups = find(ranges)
    out.write_bytes_atomic(path, json.dumps({str(k): v for k, v in dups.items()}).encode())
    return dups


def plan_build(
    cfg: CacheBuildConfig,
    out: Location,
    vae: C.VaeEntry,
    encoders: list[EncoderInfo],
    find_duplicates: FindDuplicates,
) -> Plan:
    """Discover sources, key the units, and decide per unit: reuse, partially reuse, or compute.

    `vae` / `encoders` come from `pipelines.models.describe_models` (read where the models are, not here);
    `find_duplicates(ranges)` returns range index -> duplicate row offsets (`pipelines.dedupe` on Ray); it is
    called only when the sources changed since the last build."""
    image = image_settings(cfg)
    groups = {C.LATENT_GROUP: vae.group_fingerprint} | {e.name: e.group_fingerprint for e in encoders}
    groups_key = hash_json(groups)[:12]
    spec = BuildSpec(
        output_uri=out.uri,
        storage_options=cfg.storage_options,
        image=image,
        encoders=[EncoderSpec(name=e.name, path=e.path, max_length=e.max_length) for e in cfg.encoders],
        groups=groups,
        layout=cfg.layout,
        negatives=cfg.negatives,
    )
    previous = load_manifest(out)
    prev_by_unit = {s.unit: s for s in previous.shards} if previous else {}
    done = _complete_shards(out)

    files: list[SourceFile] = []
    for src in cfg.sources:
        files.extend(discover(src, cfg.storage_options, memo=out))
    if len({f.uri for f in files}) != len(files):
        raise ConfigError("sources: two sources hold the same file; list each source file once")
    ranges: list[tuple[SourceFile, RowRange]] = []
    for sf in files:
        for start in range(0, sf.rows, cfg.rows_per_shard):
            stop = min(sf.rows, start + cfg.rows_per_shard)
            rows = RowRange(
                source=sf.source,
                source_uri=sf.uri,
                format=sf.format,
                path=sf.path,
                start=start,
                stop=stop,
                files=[(f[0], f[1]) for f in sf.files[start:stop]],
                seek=sf.tar.seek_point(start) if sf.tar is not None else None,
            )
            ranges.append((sf, rows))
    dups = _duplicates(out, files, [r for _, r in ranges], find_duplicates)

    names, tasks = [], []
    stages: set[str] = set()
    for index, (sf, rows) in enumerate(ranges):
        udup = dups.get(index, [])
        content = (
            sf.fingerprint if sf.format != "images" else [f[2] for f in sf.files[rows.start : rows.stop]]
        )
        unit = hash_json(
            {
                "contract": C.CONTRACT_VERSION,
                "uri": sf.uri,
                "content": content,
                "range": [rows.start, rows.stop],
                "dup": udup,
                "source": sf.source.unit_settings(),
                "image": image.model_dump(mode="json"),
            }
        )[:24]
        name = f"{unit}-{groups_key}"
        names.append(name)
        if name in done:
            continue
        prev = prev_by_unit.get(unit)
        reuse = [g for g in groups if prev is not None and prev.groups.get(g) == groups[g]]
        need = [g for g in groups if g not in reuse]
        if prev is not None and prev.quarantine_counts.get("caption_too_long"):
            need = list(groups)  # rows may become valid: every stage runs, on the rows not reused
        stages.update(need)
        tasks.append(
            UnitTask(
                **rows.model_dump(),
                unit=unit,
                name=name,
                dup=udup,
                need=need,
                reuse_groups=reuse,
                reuse_path=out.join(prev.path) if prev is not None and reuse else None,
            )
        )
    sources = [
        C.SourceEntry(uri=f.uri, format=f.format, fingerprint=f.fingerprint, rows=f.rows) for f in files
    ]
    return Plan(spec, sources, vae, encoders, names, tasks, previous, stages)
