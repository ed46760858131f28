"""Ray Train V2 + FSDP2 on CPU (2 workers, gloo) on the micro starter cache."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from lidit.config import ConfigError
from lidit.pipeline import LiDiTPipeline
from lidit.registry import fetch_pipeline
from tests.short_runs import LAYOUT_MODEL, assert_same_weights, generator_weights, short_run
from training.config import TrainConfig
from training.train import run_training

pytestmark = pytest.mark.usefixtures("ray_local")


def _config(micro_cache: str, tmp_path: Path, name: str, **kw) -> TrainConfig:
    return TrainConfig.model_validate(short_run(micro_cache, tmp_path / "runs", name, **kw))


def _starter_root(micro_cache: str) -> Path:
    """The micro starter's directory (where the cache's encoders and VAE live): the run's models root."""
    from lidit.cache.reader import CacheReader

    return Path(CacheReader(micro_cache).vae_path).parent


@pytest.fixture(scope="module")
def registered(micro_cache: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 30-step run registered as test-lidit@candidate, its encoders and VAE under the models root."""
    cfg = _config(
        micro_cache,
        tmp_path_factory.mktemp("loss_down"),
        "loss-down",
        steps=30,
        models_root=str(_starter_root(micro_cache)),
        optim={"lr": 3e-3, "warmup_steps": 3},
        # The cache's shape hard negatives travel through the Ray loop into the step (every noise level).
        model={"hard_negative_weight": 0.5, "hard_negative_min_sigma": 0.0},
        tracking={
            "registered_model": "test-lidit",
            "alias": "candidate",
            "log_every": 5,
            "sample_every": 10,
            "system_metrics_every_s": 1,
            "eval_starter": str(_starter_root(micro_cache)),
            "eval_prompts": 6,
            "eval_batch_size": 4,  # two batches: image k keeps noise seed k across batches
        },
    )
    return run_training(cfg)


def test_loss_goes_down_and_version_generates(registered: dict, micro_cache: str) -> None:
    summary = registered
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

    # The captioned grid: two 64 px tiles and, under them, their prompts (taller than the bare tiles).
    grid = mlflow.artifacts.load_image(f"runs:/{summary['mlflow_run_id']}/samples/step_000030.png")
    assert grid.size[0] == 2 * (64 + 2) + 2 and grid.size[1] > 64 + 2 * 2

    local = fetch_pipeline("models:/test-lidit@candidate")
    pipe = LiDiTPipeline.from_pretrained(local, models_root=_starter_root(micro_cache))
    images = pipe(["a red circle"], num_inference_steps=3, height=64, width=64, seed=0)
    assert images[0].size == (64, 64)
    assert np.asarray(images[0]).std() > 0


def test_version_serves_from_a_second_home_with_models_elsewhere(
    registered: dict, micro_cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another machine: its own LIDIT_HOME, the same registry, the starter models copied to another root."""
    import io
    import shutil

    import pandas as pd
    from PIL import Image

    from lidit.pipeline import FingerprintMismatchError, read_spec

    starter = _starter_root(micro_cache)
    elsewhere = tmp_path / "models"
    for name in ("lm_llama", "lm_qwen2", "vae"):
        shutil.copytree(starter / name, elsewhere / name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())  # the shared registry
    monkeypatch.setenv("LIDIT_HOME", str(tmp_path / "home2"))
    monkeypatch.setenv("LIDIT_MODELS_ROOT", str(elsewhere))

    local = fetch_pipeline("models:/test-lidit@candidate")
    assert local.is_relative_to(tmp_path / "home2")
    spec = read_spec(local)
    assert spec.vae == "lidit-models://vae"
    assert {e.path for e in spec.encoders} == {"lidit-models://lm_llama", "lidit-models://lm_qwen2"}
    pipe = LiDiTPipeline.from_pretrained(local)
    assert all(Path(e.config.path).is_relative_to(elsewhere) for e in pipe.encoders)
    want = np.asarray(pipe(["a red circle"], num_inference_steps=3, seed=5)[0])

    # The pyfunc flavor of the same version: PNG bytes, the pipeline's image for the same prompt and seed.
    model = mlflow.pyfunc.load_model("models:/test-lidit@candidate")
    pngs = model.predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [5]}), {"num_inference_steps": 3})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(pngs[0])).convert("RGB")), want)

    (elsewhere / "vae" / "config.json").write_text((starter / "vae" / "config.json").read_text() + " ")
    with pytest.raises(FingerprintMismatchError, match="VAE at .* but the generator was trained on"):
        LiDiTPipeline.from_pretrained(local)


def test_resume_matches_uninterrupted_run(micro_cache: str, tmp_path: Path, straight_weights: dict) -> None:
    first = run_training(_config(micro_cache, tmp_path, "resumed", stop_after=4, model=LAYOUT_MODEL))
    assert first["steps"] == 4 and first["model_version"] is None
    assert [p.name for p in (tmp_path / "runs" / "resumed").glob("step_*")] == ["step_000004"]
    # A config whose optimizer the checkpoint cannot fill fails on the driver, from Ray's own record of the
    # latest checkpoint, before Ray Train starts (not in every worker, max_failures times over).
    with pytest.raises(ConfigError, match=r"^optim.text_lr_scale: the checkpoint's optimizer has 1 param"):
        run_training(
            _config(micro_cache, tmp_path, "resumed", model=LAYOUT_MODEL, optim={"text_lr_scale": 0.5})
        )
    second = run_training(_config(micro_cache, tmp_path, "resumed", model=LAYOUT_MODEL))
    assert second["steps"] == 8
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # one MLflow run across both invocations
    assert_same_weights(straight_weights, generator_weights(second["mlflow_run_id"]))
    # Started again once finished, the run trains, exports and registers nothing: the same run comes back.
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "resumed").glob("step_*"))
    again = run_training(_config(micro_cache, tmp_path, "resumed", model=LAYOUT_MODEL))
    assert again["mlflow_run_id"] == second["mlflow_run_id"] and again["steps"] == 8
    assert again["final_loss"] == pytest.approx(second["final_loss"])
    assert not second["already_finished"] and again["already_finished"]
    # The run's own span (first start to end: both invocations) is at least the training this call skipped.
    assert again["run_seconds"] >= second["seconds"] > again["seconds"]
    assert sorted(p.name for p in (tmp_path / "runs" / "resumed").glob("step_*")) == checkpoints


def test_the_run_records_system_metrics_dataset_and_resolved_params(
    registered: dict, micro_cache: str
) -> None:
    from lidit.cache.contract import manifest_name
    from lidit.cache.reader import CacheReader
    from lidit.generator import count_parameters
    from training.loop import build_generator_config

    client = mlflow.MlflowClient()
    run = client.get_run(registered["mlflow_run_id"])
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system

    reader = CacheReader(micro_cache)
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == f"feature-cache-v{reader.version}"
    assert json.loads(dataset.source)["uri"] == f"{reader.uri}/{manifest_name(reader.version)}"
    profile = json.loads(dataset.profile)
    assert profile["rows"] == reader.num_rows and profile["version"] == reader.version
    assert profile["vae_fingerprint"] == reader.vae_fingerprint
    assert {k: v for k, v in profile.items() if k.startswith("encoder.")} == {
        f"encoder.{n}": fp for n, fp in reader.encoder_fingerprints.items()
    }
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"

    params = run.data.params
    assert "None" not in params.values() and not {"fail_at_step", "stop_after"} & params.keys()
    assert params["cache_version"] == str(reader.version)
    assert json.loads(params["model.encoders"]) == reader.encoder_names
    cfg = TrainConfig.model_validate({"cache": micro_cache})
    assert params["params.total"] == str(count_parameters(build_generator_config(cfg, reader)))
    assert int(params["params.backbone"]) < int(params["params.total"])
    assert params["generator.depth"] == str(build_generator_config(cfg, reader).depth)


def test_held_out_scores_are_on_the_run_and_the_version_and_reproduce(
    registered: dict, micro_cache: str
) -> None:
    from lidit.experiment import EvalSection, evaluate_pipeline, report_metrics
    from lidit.starter import heldout_prompts

    client = mlflow.MlflowClient()
    run = client.get_run(registered["mlflow_run_id"])
    scores = {k: v for k, v in run.data.metrics.items() if k.startswith("heldout.")}
    assert {
        "heldout.overall",
        "heldout.cat.colour",
        "heldout.cat.shape",
        "heldout.cat.binding",
    } <= scores.keys()
    assert all(0.0 <= v <= 1.0 for v in scores.values()), scores
    report = mlflow.artifacts.load_dict(f"runs:/{registered['mlflow_run_id']}/eval/heldout.json")
    assert report["n_images"] == 6 and report["settings"]["sample_steps"] == 2  # tracking.sample_steps
    version = client.get_model_version_by_alias("test-lidit", "candidate")
    assert {k: float(v) for k, v in version.tags.items() if k.startswith("eval.")} == pytest.approx(
        {f"eval.{k}": v for k, v in scores.items()}, abs=5e-5
    )
    # The scores are those of the registered weights: scoring the version again gives the same report.
    local = fetch_pipeline("models:/test-lidit@candidate")
    pipe = LiDiTPipeline.from_pretrained(local, models_root=_starter_root(micro_cache))
    prompts = heldout_prompts(_starter_root(micro_cache), 6)
    again, _ = evaluate_pipeline(pipe, prompts, EvalSection(**report["settings"]), size=64)
    assert again.n_images == 6 and again.to_dict()["categories"] == report["categories"]
    rescored = {f"heldout.{k}": v for k, v in report_metrics(again.to_dict()).items() if v is not None}
    assert rescored == pytest.approx(scores)
