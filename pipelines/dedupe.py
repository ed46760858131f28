"""Duplicate ids across every source row, found by Ray tasks so the driver never holds an id.

First occurrence wins, in source order (the order of the planner's row ranges, then row order). A hash
shuffle: one task per row range reads only its ids and splits them into P partitions by a hash of the id;
one task per partition sorts its (id, order) pairs and returns the orders of the later occurrences. The
driver holds P references per range and gets back only the duplicates, so its memory is O(ranges + dups).
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lidit.cache.storage import open_location
from pipelines.sources import read_ids
from pipelines.tasks import RowRange

ROW_BITS = 32  # order = range index << 32 | row offset in the range: one int64, sorts in source order
MAX_PARTITIONS = 16
_SCHEMA = pa.schema([("id", pa.string()), ("order", pa.int64())])


def partition_ids(
    index: int, rows: RowRange, storage_options: dict, partitions: int
) -> list[pa.Table] | pa.Table:
    """(id, order) of a range's rows with an id, split into `partitions` tables by a stable hash of the id
    (one table, not a list of one, when `partitions` is 1: Ray's `num_returns=1` returns the value as is)."""
    ids = read_ids(open_location(rows.source_uri, storage_options), rows)
    parts: list[tuple[list[str], list[int]]] = [([], []) for _ in range(partitions)]
    base = index << ROW_BITS
    for offset, rid in enumerate(ids):
        if rid:  # missing ids are quarantined as such, never duplicates
            p = zlib.crc32(rid.encode()) % partitions
            parts[p][0].append(rid)
            parts[p][1].append(base | offset)
    tables = [pa.table([pa.array(i, pa.string()), pa.array(o, pa.int64())], schema=_SCHEMA) for i, o in parts]
    return tables[0] if partitions == 1 else tables


def later_occurrences(*parts: pa.Table) -> np.ndarray:
    """Orders of the rows whose id occurred at a smaller order (same partition of every range)."""
    table = pa.concat_tables(parts)
    if table.num_rows < 2:
        return np.zeros(0, np.int64)
    table = table.take(pc.sort_indices(table, [("id", "ascending"), ("order", "ascending")]))
    ids = table.column("id").combine_chunks()
    same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
    return table.column("order").to_numpy()[1:][same]


def find_duplicates(ranges: list[RowRange], storage_options: dict, num_cpus: float) -> dict[int, list[int]]:
    """Range index -> row offsets (in the range) of its duplicate ids; ranges without duplicates are absent."""
    import ray

    if not ranges:
        return {}
    partitions = max(1, min(MAX_PARTITIONS, len(ranges)))
    split = ray.remote(partition_ids).options(num_returns=partitions, num_cpus=num_cpus)
    reduce = ray.remote(later_occurrences).options(num_cpus=num_cpus)
    refs = [split.remote(i, r, storage_options, partitions) for i, r in enumerate(ranges)]
    if partitions == 1:
        refs = [[r] for r in refs]
    found = ray.get([reduce.remote(*[r[p] for r in refs]) for p in range(partitions)])
    out: dict[int, list[int]] = {}
    mask = (1 << ROW_BITS) - 1
    for order in sorted(int(o) for arr in found for o in arr):
        out.setdefault(order >> ROW_BITS, []).append(order & mask)
    return out
