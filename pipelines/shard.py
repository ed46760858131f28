"""Write one computed unit where the cache lives (local or s3://), from the worker that holds its rows.

Order (the contract's commit protocol): quarantine file, shard (both atomic), then the sidecar JSON that marks
the unit complete; a build killed in between leaves no sidecar and the unit is computed again.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lidit.cache import contract as C
from lidit.cache.storage import open_location
from lidit.fingerprint import hash_bytes
from pipelines.stages import COL_DETAIL, COL_REASON, new_column
from pipelines.tasks import BuildSpec, ShardResult, UnitTask


def parquet_bytes(table: pa.Table) -> bytes:
    """zstd Parquet; dictionary encoding on string columns only (it bloats the float payloads)."""
    buf = io.BytesIO()
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    pq.write_table(table, buf, compression="zstd", use_dictionary=strings, row_group_size=4096)
    return buf.getvalue()


def write_shard(spec: BuildSpec, task: UnitTask, table: pa.Table) -> ShardResult:
    """Split `table` (all rows of `task`) into shard + quarantine, write both and the sidecar."""
    out = open_location(spec.output_uri, spec.storage_options)
    if table.num_rows != task.rows:
        raise RuntimeError(f"internal error: unit {task.name}: {table.num_rows} rows, expected {task.rows}")
    table = table.sort_by(C.COL_SOURCE_ROW)
    bad_mask = pc.is_valid(table.column(COL_REASON))
    good, bad = table.filter(pc.invert(bad_mask)), table.filter(bad_mask)
    schema = C.shard_schema(spec.encoder_names, spec.layout, spec.negatives)
    for col in schema.names:
        if not schema.field(col).nullable and good.column(col).null_count:
            raise RuntimeError(f"internal error: unit {task.name}: column {col} not computed for some rows")
    shard = pa.Table.from_arrays(
        [good.column(c).cast(schema.field(c).type) for c in schema.names], schema=schema
    )
    quarantine = pa.Table.from_arrays(
        [bad.column(c) for c in (C.COL_ID, C.COL_SOURCE, C.COL_SOURCE_ROW)]
        + [bad.column(COL_REASON), bad.column(COL_DETAIL).fill_null("")],
        schema=C.QUARANTINE_SCHEMA,
    )
    q_path = f"{C.QUARANTINE_DIR}/{task.name}.parquet"
    out.write_bytes_atomic(out.join(q_path), parquet_bytes(quarantine))
    data = parquet_bytes(shard)
    s_path = f"{C.SHARD_DIR}/{task.name}.parquet"
    out.write_bytes_atomic(out.join(s_path), data)
    reasons = bad.column(COL_REASON).to_pylist()
    counts = {r: reasons.count(r) for r in sorted(set(reasons))}
    computed = {g: int(pc.sum(good.column(new_column(g))).as_py() or 0) for g in spec.groups}
    entry = C.ShardEntry(
        path=s_path,
        rows=shard.num_rows,
        bytes=len(data),
        sha256=hash_bytes(data),
        unit=task.unit,
        source=task.source_uri,
        groups=spec.groups,
        quarantine_path=q_path,
        quarantine_rows=quarantine.num_rows,
        quarantine_counts=counts,
    )
    out.write_bytes_atomic(out.join(C.sidecar_name(task.name)), entry.model_dump_json().encode())
    return ShardResult(entry=entry, computed=computed)
