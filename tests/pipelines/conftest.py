from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True, scope="package")
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """MLflow and default state of the cache tests under a temp LIDIT_HOME (never the developer's)."""
    saved = {k: os.environ.get(k) for k in ("LIDIT_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["LIDIT_HOME"] = str(tmp_path_factory.mktemp("lidit_home"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def cache_starter(request: pytest.FixtureRequest) -> Any:
    """The micro starter set: the suite's `starter_micro`, or a prebuilt one at $LIDIT_TEST_STARTER_DIR
    (verified by fingerprint and reused, which saves minutes when iterating on these tests alone)."""
    prebuilt = os.environ.get("LIDIT_TEST_STARTER_DIR")
    if prebuilt:
        from lidit.starter import build_starter

        return build_starter(prebuilt, preset="micro", progress=False)
    return request.getfixturevalue("starter_micro")


def cache_config(starter: Any, output: Path | str, **overrides: Any) -> dict[str, Any]:
    """A small CacheBuildConfig dict over the micro starter set (3 shards of the train split)."""
    cfg: dict[str, Any] = {
        "sources": [{"uri": str(starter.train_parquet)}],
        "output": str(output),
        "vae": str(starter.vae),
        "encoders": [
            {"name": "llama", "path": str(starter.lm_llama), "max_length": 64},
            {"name": "qwen2", "path": str(starter.lm_qwen2), "max_length": 64},
        ],
        "resolution": 64,
        "rows_per_shard": 100,
        "vae_stage": {"num_cpus": 0.5, "batch_size": 64, "threads": 1},
        "encoder_stage": {"num_cpus": 0.25, "batch_size": 64, "threads": 1},
        "mlflow": False,
        "progress": False,
    }
    cfg.update(overrides)
    return cfg


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """An img2dataset-style tar: each sample's members `KEY.EXT` back to back."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def starter_samples(starter, start: int, stop: int) -> list[tuple[str, dict[str, bytes]]]:
    """Rows [start, stop) of the micro starter's train split as (id, {png, txt}) samples."""
    import pyarrow.parquet as pq

    first = sorted(Path(starter.train_parquet).glob("*.parquet"))[0]
    rows = pq.read_table(first, columns=["id", "image", "caption"]).slice(start, stop - start).to_pylist()
    return [(r["id"], {"png": r["image"], "txt": r["caption"].encode()}) for r in rows]
