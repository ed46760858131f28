"""Duplicate ids across sources, found by Ray tasks (the driver reads no ids): first occurrence wins."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.dedupe import find_duplicates, later_occurrences, partition_ids
from pipelines.sources import SourceConfig, discover
from pipelines.tasks import RowRange


def _ranges(tmp_path, files: dict[str, list[str | None]], per_range: int) -> list[RowRange]:
    out = []
    for name, ids in files.items():
        path = tmp_path / name
        n = len(ids)
        pq.write_table(
            pa.table({"id": ids, "image": [b""] * n, "caption": ["c"] * n}), path, row_group_size=2
        )
        for sf in discover(SourceConfig(uri=str(path)), {}):
            assert sf.rows == n and not hasattr(sf, "ids")  # discovery reads footers only
            for start in range(0, n, per_range):
                stop = min(n, start + per_range)
                out.append(
                    RowRange(
                        source=sf.source,
                        source_uri=sf.uri,
                        format="parquet",
                        path=sf.path,
                        start=start,
                        stop=stop,
                    )
                )
    return out


def test_duplicates_across_files_and_ranges(ray_local, tmp_path):
    ranges = _ranges(
        tmp_path,
        {"a.parquet": ["x", "y", "x", None, "z"], "b.parquet": ["y", "w", "", "z", "x", "v"]},
        per_range=2,
    )
    # ranges: a[0:2] a[2:4] a[4:5] b[0:2] b[2:4] b[4:6]
    assert find_duplicates(ranges, {}, num_cpus=0.25) == {1: [0], 3: [0], 4: [1], 5: [0]}


def test_partitions_are_stable_and_complete(tmp_path):
    (rows,) = _ranges(tmp_path, {"c.parquet": ["p", "q", "p", "r", "q"]}, per_range=5)
    parts = partition_ids(7, rows, {}, partitions=3)
    assert sum(t.num_rows for t in parts) == 5
    assert partition_ids(7, rows, {}, partitions=3)[1].equals(parts[1])
    dup_orders = sorted(int(o) for t in parts for o in later_occurrences(t))
    assert dup_orders == [(7 << 32) | 2, (7 << 32) | 4]
