"""WebDataset tar sources: samples from tar headers, damaged archives lose nothing silently, and a build from
tars has the incremental, quarantine and memo guarantees of Parquet sources."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from lidit.cache import contract as C
from lidit.cache.reader import CacheReader
from pipelines import webdataset
from pipelines.build import build_cache
from pipelines.config import CacheBuildConfig
from tests.pipelines.conftest import cache_config, starter_samples, write_tar


def member_offset(path: Path | bytes, name: str) -> tarfile.TarInfo:
    data = path.read_bytes() if isinstance(path, Path) else path
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmember(name)


SYNTHETIC = [
    ("a/000000", {"jpg": b"J" * 700, "txt": b"  a red circle \n"}),
    ("a/000001", {"png": b"P" * 900, "json": json.dumps({"caption": "from the json"}).encode()}),
    ("a/000002", {"webp": b"W" * 300}),  # no caption member
    ("a/000003", {"txt": b"no image member"}),
    ("a/000004", {"png": b"Q" * 2000, "txt": b"the last one"}),
]


def test_samples_counted_from_headers_and_read_by_range(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "s.tar", SYNTHETIC)
    with path.open("rb") as f:
        scan = webdataset.scan(f, path.stat().st_size)
    assert scan.rows == 5 and not scan.stopped_early
    with path.open("rb") as f:
        rows = webdataset.read_samples(f, 1, 4, ".txt", "caption")
    assert [(r.id, r.image, r.caption, r.flaw) for r in rows] == [
        ("a/000001", b"P" * 900, "from the json", None),
        ("a/000002", b"W" * 300, None, None),
        ("a/000003", None, "no image member", None),
    ]
    assert webdataset.split_name("dir/0042.seg.PNG") == ("dir/0042", "seg.png")


class ReadLog(io.BytesIO):
    """An in-memory archive that records the lowest byte offset anything was read from."""

    lowest: int | None = None

    def read(self, size: int | None = -1) -> bytes:
        pos = self.tell()
        self.lowest = pos if self.lowest is None else min(self.lowest, pos)
        return super().read(size)


def test_a_range_late_in_a_tar_starts_its_header_walk_at_the_index(tmp_path: Path) -> None:
    samples = [
        (f"{i:06d}", {"png": bytes([i % 256]) * 100, "txt": f"caption {i}".encode()}) for i in range(200)
    ]
    data = write_tar(tmp_path / "big.tar", samples).read_bytes()
    scan = webdataset.scan(io.BytesIO(data), len(data))
    every = webdataset.INDEX_EVERY
    assert scan.rows == 200 and len(scan.index) == -(-200 // every)
    assert scan.index[2] == member_offset(data, f"{2 * every:06d}.png").offset  # header of sample 128
    seek = scan.seek_point(150)
    assert seek == (2 * every, scan.index[2])
    log = ReadLog(data)
    rows = webdataset.read_samples(log, 150, 160, ".txt", "caption", seek)
    assert [(r.id, r.caption) for r in rows] == [(f"{i:06d}", f"caption {i}") for i in range(150, 160)]
    assert log.lowest == scan.index[2]  # no header before sample 128 was read
    walked = webdataset.read_samples(io.BytesIO(data), 150, 160, ".txt", "caption")  # no index: from the top
    assert [(r.id, r.image, r.caption) for r in walked] == [(r.id, r.image, r.caption) for r in rows]
    assert webdataset.seek_point([], 150) is None and scan.seek_point(10_000) == (
        (len(scan.index) - 1) * every,
        scan.index[-1],
    )


def test_a_truncated_tar_quarantines_its_cut_sample_and_keeps_the_rest(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "s.tar", SYNTHETIC)
    cut_at = member_offset(path, "a/000004.png").offset_data + 500
    cut = path.read_bytes()[:cut_at]
    scan = webdataset.scan(io.BytesIO(cut), len(cut))
    assert scan.rows == 5 and not scan.stopped_early  # the cut sample is a row: it must be quarantined
    rows = webdataset.read_samples(io.BytesIO(cut), 0, 5, ".txt", "caption")
    assert [r.flaw for r in rows[:4]] == [None] * 4 and rows[0].caption == "a red circle"
    assert rows[4].flaw == ("truncated", "a/000004.png: data ends past the end of the archive")
    assert len(rows[4].image) == 500


def test_a_corrupt_header_is_reported_not_silent(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "s.tar", SYNTHETIC)
    data = bytearray(path.read_bytes())
    header = member_offset(path, "a/000002.webp").offset
    data[header : header + 100] = b"\xff" * 100  # checksum fails: tarfile ends the archive here
    scan = webdataset.scan(io.BytesIO(bytes(data)), len(data))
    assert scan.rows == 2 and scan.stopped_early and scan.end == header
    assert webdataset.scan(io.BytesIO(b"not a tar" * 30), 270).rows == 0


@pytest.fixture(scope="module")
def tar_build(cache_starter, ray_local, tmp_path_factory) -> tuple[Path, dict, list, str]:
    """A folder of three tars from the micro starter: 20 samples, 10 + one corrupt image, 5 cut in the last."""
    root = tmp_path_factory.mktemp("wds")
    src = root / "tars"
    src.mkdir()
    write_tar(src / "part-0000.tar", starter_samples(cache_starter, 0, 20))
    corrupt = ("broken-000", {"png": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, "txt": b"a blue square"})
    write_tar(src / "part-0001.tar", [*starter_samples(cache_starter, 20, 30), corrupt])
    last = starter_samples(cache_starter, 30, 35)
    full = write_tar(root / "whole.tar", last)
    cut_at = member_offset(full, f"{last[-1][0]}.png").offset_data + 40
    (src / "part-0002.tar").write_bytes(full.read_bytes()[:cut_at])
    cfg = cache_config(cache_starter, root / "cache", sources=[{"uri": str(src)}], rows_per_shard=8)
    summary = build_cache(CacheBuildConfig.model_validate(cfg))
    return root, summary, starter_samples(cache_starter, 0, 34), last[-1][0]


def test_build_from_tars_keeps_good_rows_and_quarantines_the_bad(tar_build) -> None:
    root, s, expected, cut_key = tar_build
    assert s["rows"] == 34 and s["quarantined"] == {"undecodable": 1, "truncated": 1}, s
    assert s["shards"] == 3 + 2 + 1  # ranges of 8 rows: 20 -> 3, 11 -> 2, 5 -> 1
    reader = CacheReader(s["uri"])
    assert {src.format for src in reader.manifest.sources} == {"webdataset"}
    table = reader.to_arrow([C.COL_ID, C.COL_CAPTION, C.COL_BUCKET])
    got = dict(zip(table.column(C.COL_ID).to_pylist(), table.column(C.COL_CAPTION).to_pylist(), strict=True))
    assert got == {key: m["txt"].decode() for key, m in expected}
    q = reader.quarantine().to_pylist()
    assert {r[C.COL_ID]: r[C.COL_REASON] for r in q} == {"broken-000": "undecodable", cut_key: "truncated"}


def test_tar_rebuild_reads_no_headers_and_computes_nothing_then_adds_a_tar(
    tar_build, cache_starter, monkeypatch
) -> None:
    import pipelines.dedupe

    root, s, _, _ = tar_build

    def forbidden(*_args, **_kw):
        raise AssertionError("an unchanged source was scanned again")

    monkeypatch.setattr(webdataset, "scan", forbidden)  # the tar memo under plan/ answers
    monkeypatch.setattr(pipelines.dedupe, "find_duplicates", forbidden)
    cfg = cache_config(cache_starter, root / "cache", sources=[{"uri": str(root / "tars")}], rows_per_shard=8)
    again = build_cache(CacheBuildConfig.model_validate(cfg))
    assert again["computed"] == {"latents": 0, "llama": 0, "qwen2": 0} and not again["new_version"]

    monkeypatch.undo()
    write_tar(root / "tars" / "part-0003.tar", starter_samples(cache_starter, 40, 45))
    grown = build_cache(CacheBuildConfig.model_validate(cfg))
    assert grown["new_version"] and grown["rows"] == 34 + 5
    assert grown["computed"] == {"latents": 5, "llama": 5, "qwen2": 5}  # only the new tar's unit
