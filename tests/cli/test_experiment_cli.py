"""`lidit experiment run`: a tiny smoke ladder end to end (cache -> training runs -> scoring -> report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.main import main

REPO = Path(__file__).resolve().parents[2]


def _smoke_config(tmp_path: Path, starter: Any) -> Path:
    cfg = {
        "name": "smoke-ladder",
        "starter": str(starter.root),
        "starter_preset": "micro",
        "work_dir": str(tmp_path / "work"),
        "cache_config": str(REPO / "configs" / "starter" / "cache.yaml"),
        "cache_set": [
            "rows_per_shard=120",
            "vae_stage.threads=1",
            "vae_stage.num_cpus=0.5",
            "mlflow=false",
            "progress=false",
        ],
        "train_config": str(REPO / "configs" / "starter" / "train.yaml"),
        "train_set": [
            "scale.workers=1",
            "optim.warmup_steps=0",
            "checkpoint.every=100",
            "tracking.log_every=1",
        ],
        "steps": 2,
        "batch_size": 8,
        "seeds": [0],
        "encoders": [
            {"name": "llama", "lm": "llama"},
            {"name": "llama_noinst", "lm": "llama", "instruction": False},
            {"name": "qwen2", "lm": "qwen2"},
        ],
        "variants": [
            {"name": "raw", "encoders": ["llama_noinst"], "set": ["model.refiner_depth=0"], "paper": "38.72"},
            {
                "name": "causal_concat",
                "encoders": ["llama", "qwen2"],
                "set": ["model.fusion=concat", "model.refiner_causal=true"],
            },
        ],
        "eval": {"prompts": 6, "sample_steps": 2, "batch_size": 4, "grid": 4},
    }
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("LIDIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # restored after the test: other tests keep their store
    return uri


def _run(config: Path, results: Path, capsys: pytest.CaptureFixture, *extra: str) -> dict[str, Any]:
    assert main(["experiment", "run", str(config), "--results", str(results), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_smoke_ladder_trains_scores_reports_and_resumes(
    starter_micro: Any, ray_local: Any, tmp_path: Path, isolated_mlflow: str, capsys: pytest.CaptureFixture
) -> None:
    import mlflow

    config = _smoke_config(tmp_path, starter_micro)
    results = tmp_path / "results"
    summary = _run(config, results, capsys)

    # Every variant trained with the shared budget and was scored on the held-out prompts.
    assert [v["name"] for v in summary["variants"]] == ["raw", "causal_concat"]
    for v in summary["variants"]:
        assert v["seeds"] == [0] and v["n_images"] == 6
        assert 0.0 <= v["metrics"]["overall"]["mean"] <= 1.0
    assert summary["budget"] == {"steps": 2, "batch_size": 8, "seeds": [0]}
    assert summary["cache"]["rows"] == 240

    # Report files: table with both rows, JSON equal to the summary's variants, plot and sample grid.
    table = (results / "ladder.md").read_text()
    assert "| `raw` | llama_noinst | 1 |" in table and "| `causal_concat` | llama, qwen2 | 1 |" in table
    assert "38.72" in table and "2 steps x batch 8" in table
    assert json.loads((results / "ladder.json").read_text())["variants"] == summary["variants"]
    assert (results / "ladder_by_position.png").stat().st_size > 0
    assert (results / "ladder_samples.png").stat().st_size > 0

    # The exported pipelines carry each variant's switches and encoders; the no-instruction encoder reads no
    # instruction.
    work = tmp_path / "work"

    def result(variant: str, seed: int) -> dict[str, Any]:
        return json.loads((work / "results" / variant / f"seed{seed}.json").read_text())

    raw = Path(result("raw", 0)["pipeline"])
    spec = json.loads((raw / "pipeline.json").read_text())
    assert [e["name"] for e in spec["encoders"]] == ["llama_noinst"] and spec["encoders"][0][
        "instruction"
    ] == ""
    assert json.loads((raw / "generator" / "config.json").read_text())["refiner_depth"] == 0
    both = json.loads(
        (Path(result("causal_concat", 0)["pipeline"]) / "generator" / "config.json").read_text()
    )
    assert both["refiner_causal"] is True and both["fusion"] == "concat"
    assert [e["name"] for e in both["encoders"]] == ["llama", "qwen2"]

    # A second seed and other eval settings: only raw/seed 1 trains; raw/seed 0 is scored again, not retrained.
    client = mlflow.MlflowClient(isolated_mlflow)
    exp = client.get_experiment_by_name("smoke-ladder")
    n_runs = len(client.search_runs([exp.experiment_id]))
    trained_before = result("raw", 0)["mlflow_run_id"]
    again = _run(
        config,
        tmp_path / "again",
        capsys,
        "--variants",
        "raw",
        "--set",
        "seeds=[0, 1]",
        "--set",
        "eval.prompts=4",
    )
    (raw_summary,) = again["variants"]
    assert raw_summary["seeds"] == [0, 1] and raw_summary["n_images"] == 8
    assert raw_summary["metrics"]["overall"]["n"] == 2
    assert result("raw", 0)["mlflow_run_id"] == trained_before and result("raw", 0)["eval"]["n_images"] == 4
    assert len(client.search_runs([exp.experiment_id])) == n_runs + 2  # raw/seed 1 + this summary run

    # Each (variant, seed) is one MLflow run with its eval metrics and tags.
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`lidit.experiment.variant` != ''")
    assert sorted(
        (r.data.tags["lidit.experiment.variant"], r.data.tags["lidit.experiment.seed"]) for r in runs
    ) == [
        ("causal_concat", "0"),
        ("raw", "0"),
        ("raw", "1"),
    ]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert 0.0 <= r.data.metrics["eval.overall"] <= 1.0
        assert r.data.params["steps"] == "2" and r.data.params["seed"] == r.data.tags["lidit.experiment.seed"]

    # Another budget over the same work dir is refused before anything trains (results would mix).
    assert main(["experiment", "run", str(config), "--set", "steps=3"]) == 2
    assert "trained with other settings or data" in capsys.readouterr().err
    assert len(client.search_runs([exp.experiment_id])) == n_runs + 2


def test_unknown_variant_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cache_config": "c.yaml",
                "train_config": "t.yaml",
                "steps": 1,
                "batch_size": 2,
                "encoders": [{"name": "a", "lm": "llama"}],
                "variants": [{"name": "one", "encoders": ["a"]}],
            }
        )
    )
    assert main(["experiment", "run", str(config), "--variants", "one,two"]) == 2
    assert "no variant 'two'" in capsys.readouterr().err
