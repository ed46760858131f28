"""The short Ray training run that resume and restart tests compare with an uninterrupted one.

tests/training (stop and resume on one node) and tests/infra (a worker killed on a two-node cluster) both end
their runs where `straight_weights`, one uninterrupted run trained once per session, ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# The layout recipe's model: its layout targets travel through the Ray loop too, and resume must replay them
# like the rest of a step.
LAYOUT_MODEL = {"layout_weight": 0.5, "overrides": {"layout_attention": True}}


def short_run(cache: str, storage_path: Path, name: str, **overrides: Any) -> dict[str, Any]:
    """Settings of an 8-step run on `cache` (2 workers, checkpoints every 4 steps); a dict value in
    `overrides` updates that section, anything else replaces the key."""
    base: dict[str, Any] = dict(
        cache=cache,
        name=name,
        storage_path=str(storage_path),
        steps=8,
        batch_size=8,
        seed=3,
        optim={"lr": 2e-3, "warmup_steps": 2, "ema_decay": 0.5},
        checkpoint={"every": 4, "keep": 2, "max_failures": 1},
        tracking={
            "experiment": "test-train",
            "registered_model": None,
            "log_every": 1,
            "num_samples": 2,
            "sample_steps": 2,
        },
    )
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def generator_weights(run_id: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The exported generator's state dict of an MLflow run (its `pipeline` artifact)."""
    import mlflow

    from lidit.generator import LiDiTGenerator
    from lidit.pipeline import GENERATOR_DIR
    from lidit.registry import find_pipeline_dir

    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="pipeline", tracking_uri=tracking_uri
    )
    return LiDiTGenerator.from_pretrained(find_pipeline_dir(local) / GENERATOR_DIR).state_dict()


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Same data order, per-step RNG and schedule: equal up to float reassociation in the all-reduce."""
    import torch

    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.fixture(scope="session")
def straight_weights(micro_cache: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """EMA weights of an uninterrupted `short_run` of the layout model: the reference for resumed and
    restarted runs."""
    from training.config import TrainConfig
    from training.train import run_training

    storage = tmp_path_factory.mktemp("straight") / "runs"
    summary = run_training(
        TrainConfig.model_validate(short_run(micro_cache, storage, "straight", model=LAYOUT_MODEL))
    )
    assert summary["steps"] == 8
    weights = generator_weights(summary["mlflow_run_id"])
    scales = [v for k, v in weights.items() if k.endswith("layout_scale")]
    assert scales and all(s.abs().sum() > 0 for s in scales)  # zero-init: trained through the layout path
    return weights
