"""Session fixtures shared across the whole suite."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def starter_micro(tmp_path_factory: pytest.TempPathFactory):
    """The `micro` starter set, built once per test session (tens of seconds on 2 cores).

    Cache, training and serving tests reuse it: real (if barely trained) tokenizer, LMs and VAE on disk in the
    standard formats, plus Parquet shards and image folders. Treat it as read-only.
    """
    from lidit.starter import build_starter

    return build_starter(tmp_path_factory.mktemp("starter_micro"), preset="micro", progress=False)


@pytest.fixture(scope="session")
def micro_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A feature cache of the micro starter train split (both starter LMs + the starter VAE, layout targets and
    shape hard negatives, as configs/starter/cache.yaml builds it), built once."""
    request.getfixturevalue("ray_local")  # the build runs on the session's Ray
    prebuilt = os.environ.get("LIDIT_TEST_STARTER_DIR")
    if prebuilt:
        from lidit.starter import build_starter

        starter_micro = build_starter(prebuilt, preset="micro", progress=False)
    else:
        starter_micro = request.getfixturevalue("starter_micro")
    if "LIDIT_HOME" not in os.environ:  # MLflow store of these tests: never the developer's
        os.environ["LIDIT_HOME"] = str(tmp_path_factory.mktemp("lidit_home"))
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    from pipelines.build import build_cache
    from pipelines.config import CacheBuildConfig

    out = tmp_path_factory.mktemp("train_cache") / "cache"
    cfg = CacheBuildConfig.model_validate(
        {
            "sources": [
                {
                    "uri": str(starter_micro.train_parquet),
                    "grounding_column": "grounding",
                    "negative_caption_column": "shape_negative",
                }
            ],
            "output": str(out),
            "vae": str(starter_micro.vae),
            "encoders": [
                {"name": "llama", "path": str(starter_micro.lm_llama), "max_length": 64},
                {"name": "qwen2", "path": str(starter_micro.lm_qwen2), "max_length": 64},
            ],
            "resolution": 64,
            "vae_stage": {"num_cpus": 0.5, "batch_size": 64, "threads": 1},
            "encoder_stage": {"num_cpus": 0.25, "batch_size": 64, "threads": 1},
            "mlflow": False,
            "progress": False,
        }
    )
    build_cache(cfg)
    return str(out)


from tests.ray_fixtures import ray_local  # noqa: E402, F401  (one shared Ray per session, for every stage test)
from tests.short_runs import straight_weights  # noqa: E402, F401  (the uninterrupted run resume tests compare with)
