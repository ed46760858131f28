"""Ray Train V2 + FSDP2 on CPU (2 workers, gloo) on the micro starter cache."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from lidit.generator import LiDiTGenerator
from lidit.pipeline import GENERATOR_DIR, LiDiTPipeline
from lidit.registry import fetch_pipeline
from training.config import TrainConfig
from training.train import run_training

pytestmark = pytest.mark.usefixtures("ray_local")


def _config(micro_cache: str, tmp_path: Path, name: str, **kw) -> TrainConfig:
    base = dict(
        cache=micro_cache,
        name=name,
        storage_path=str(tmp_path / "runs"),
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
    for key, value in kw.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return TrainConfig.model_validate(base)


def _generator_weights(run_id: str) -> dict[str, torch.Tensor]:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="pipeline")
    return LiDiTGenerator.from_pretrained(Path(local) / GENERATOR_DIR).state_dict()


def test_loss_goes_down_and_version_generates(micro_cache: str, tmp_path: Path) -> None:
    cfg = _config(
        micro_cache,
        tmp_path,
        "loss-down",
        steps=30,
        optim={"lr": 3e-3, "warmup_steps": 3},
        tracking={"registered_model": "test-lidit", "alias": "candidate", "log_every": 5, "sample_every": 10},
    )
    summary = run_training(cfg)
    assert summary["steps"] == 30 and summary["model_version"] is not None
    history = [m.value for m in mlflow.MlflowClient().get_metric_history(summary["mlflow_run_id"], "loss")]
    assert len(history) == 6
    assert history[-1] < 0.8 * history[0], history  # epsilon-MSE starts near 1 and must fall

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("test-lidit", "candidate")
    assert version.version == summary["model_version"]
    assert version.tags["cache_manifest"].endswith(".json")
    assert any(k.startswith("encoder.") for k in version.tags)
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert {"pipeline", "plots", "samples"} <= artifacts
    # 2 workers: no intermediate grid stalls the other ranks; the one grid is drawn after the last step.
    samples = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "samples")}
    assert samples == {"samples/step_000030.png", "samples/prompts.txt"}, samples

    pipe = LiDiTPipeline.from_pretrained(fetch_pipeline("models:/test-lidit@candidate"))
    images = pipe(["a red circle"], num_inference_steps=3, height=64, width=64, seed=0)
    assert images[0].size == (64, 64)
    assert np.asarray(images[0]).std() > 0


@pytest.fixture(scope="module")
def straight_weights(micro_cache: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """EMA weights of an uninterrupted 8-step run: the reference for resumed and restarted runs."""
    summary = run_training(_config(micro_cache, tmp_path_factory.mktemp("straight"), "straight"))
    assert summary["steps"] == 8
    return _generator_weights(summary["mlflow_run_id"])


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # Same data order, per-step RNG and schedule: equal up to float reassociation in the all-reduce.
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def test_resume_matches_uninterrupted_run(micro_cache: str, tmp_path: Path, straight_weights: dict) -> None:
    first = run_training(_config(micro_cache, tmp_path, "resumed", stop_after=4))
    assert first["steps"] == 4 and first["model_version"] is None
    assert [p.name for p in (tmp_path / "runs" / "resumed").glob("step_*")] == ["step_000004"]
    second = run_training(_config(micro_cache, tmp_path, "resumed"))
    assert second["steps"] == 8
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # one MLflow run across both invocations
    _assert_same_weights(straight_weights, _generator_weights(second["mlflow_run_id"]))


def test_killed_worker_restarts_from_checkpoint(
    micro_cache: str, tmp_path: Path, straight_weights: dict
) -> None:
    summary = run_training(_config(micro_cache, tmp_path, "killed", fail_at_step=6))
    assert summary["steps"] == 8
    assert (tmp_path / "runs" / "killed" / ".failed_once").exists()  # a worker really died at step 6
    # Restarted from the step-4 checkpoint, the run ends exactly where an uninterrupted one does.
    _assert_same_weights(straight_weights, _generator_weights(summary["mlflow_run_id"]))
