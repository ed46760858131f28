"""The same build against S3 (moto's server on 127.0.0.1, started and stopped here)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lidit.cache import contract as C
from lidit.cache.reader import CacheReader, batch_to_training_inputs
from pipelines.build import build_cache
from pipelines.config import CacheBuildConfig
from tests.pipelines.conftest import cache_config, starter_samples, write_tar


@pytest.fixture
def s3_server(monkeypatch):
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    if not fs.exists("lidit-test"):  # moto's backend is per process: a second server sees the bucket
        fs.mkdir("lidit-test")
    yield fs, opts
    server.stop()


def _s3_config(cache_starter, fs, opts: dict, out: str) -> dict:
    """A build of the micro train split's first file (100 rows), uploaded to the bucket, into s3://.../OUT."""
    first = sorted(Path(cache_starter.train_parquet).glob("*.parquet"))[0]
    fs.put(str(first), "lidit-test/src/part-0.parquet")
    return cache_config(
        cache_starter,
        f"s3://lidit-test/{out}",
        sources=[{"uri": "s3://lidit-test/src"}],
        storage_options=opts,
        rows_per_shard=50,
    )


def test_build_and_read_on_s3(cache_starter, ray_local, s3_server):
    import ray

    fs, opts = s3_server
    cfg = _s3_config(cache_starter, fs, opts, "cache")
    s = build_cache(CacheBuildConfig.model_validate(cfg))
    assert s["uri"] == "s3://lidit-test/cache" and s["shards"] == 2
    assert s["rows"] + s["quarantined_total"] == 100
    assert fs.exists("lidit-test/cache/manifests/v000001.json")

    reader = CacheReader("s3://lidit-test/cache", storage_options=opts)
    table = reader.to_arrow()
    ids = table.column(C.COL_ID).to_pylist()
    assert len(ids) == len(set(ids)) == s["rows"]
    ds = ray.data.read_parquet(reader.shard_uris(), filesystem=reader.filesystem)
    assert ds.count() == s["rows"]
    batch = next(iter(ds.iter_batches(batch_size=16, batch_format="numpy")))
    latents, feats, bids = batch_to_training_inputs(batch, reader)
    assert latents.shape[0] == len(bids) == 16 and len(feats) == 2

    again = build_cache(CacheBuildConfig.model_validate(cfg))  # incremental on S3 too
    assert again["computed"] == {"latents": 0, "llama": 0, "qwen2": 0} and not again["new_version"]


def test_build_from_tars_on_s3(cache_starter, ray_local, s3_server, tmp_path):
    fs, opts = s3_server
    for part, (start, stop) in enumerate([(0, 12), (12, 20)]):
        local = write_tar(tmp_path / f"part-{part}.tar", starter_samples(cache_starter, start, stop))
        fs.put(str(local), f"lidit-test/wds/part-{part}.tar")
    cfg = cache_config(
        cache_starter,
        "s3://lidit-test/wds-cache",
        sources=[{"uri": "s3://lidit-test/wds"}],
        storage_options=opts,
        rows_per_shard=8,
    )
    s = build_cache(CacheBuildConfig.model_validate(cfg))
    assert s["rows"] == 20 and s["quarantined_total"] == 0 and s["shards"] == 2 + 1
    ids = CacheReader("s3://lidit-test/wds-cache", storage_options=opts).to_arrow([C.COL_ID]).column(0)
    assert sorted(ids.to_pylist()) == sorted(key for key, _ in starter_samples(cache_starter, 0, 20))
    assert fs.find("lidit-test/wds-cache/plan", prefix="tar-") or fs.glob(
        "lidit-test/wds-cache/plan/tar-*.json"
    )


def test_racing_builds_commit_exactly_one_version(
    cache_starter, ray_local, s3_server, monkeypatch, capsys, tmp_path
):
    """Two builds plan on the same (empty) cache and reach the commit together: the conditional PUT lets one
    version land; the other build exits 1 with one line."""
    import threading

    import yaml

    import pipelines.build
    from lidit.cache.storage import open_location
    from pipelines.commit import commit_manifest

    fs, opts = s3_server
    cfg = _s3_config(cache_starter, fs, opts, "race")
    barrier = threading.Barrier(2, timeout=600)

    def commit_together(out, manifest):  # both builds have planned v1 before either writes it
        barrier.wait()
        commit_manifest(out, manifest)

    monkeypatch.setattr(pipelines.build, "commit_manifest", commit_together)
    config = tmp_path / "race.yaml"
    config.write_text(yaml.safe_dump(cfg))
    codes: list[int] = []
    threads = [
        threading.Thread(target=lambda: codes.append(pipelines.build.main([str(config)]))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert sorted(codes) == [0, 1]
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "version 1 was committed by another build meanwhile" in err[0], err
    assert fs.ls("lidit-test/race/manifests") == ["lidit-test/race/manifests/v000001.json"]
    loc = open_location("s3://lidit-test/race", opts)
    assert CacheReader("s3://lidit-test/race", storage_options=opts).manifest.version == 1
    # the arbiter itself: a create-only write of an existing manifest fails
    with pytest.raises(FileExistsError):
        loc.write_bytes_exclusive(loc.join("manifests/v000001.json"), b"{}")
