"""Session fixtures shared across the whole suite."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def starter_micro(tmp_path_factory: pytest.TempPathFactory):
    """The `micro` starter set, built once per test session (tens of seconds on 2 cores).

    Cache, training and serving tests reuse it: real (if barely trained) tokenizer, LMs and VAE on disk in the
    standard formats, plus Parquet shards and image folders. Treat it as read-only.
    """
    from lidit.starter import build_starter

    return build_starter(tmp_path_factory.mktemp("starter_micro"), preset="micro", progress=False)


from tests.ray_fixtures import ray_local  # noqa: E402, F401  (one shared Ray per session, for every stage test)
