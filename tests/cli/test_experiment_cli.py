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
        "seeds": [0, 1],
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


def test_smoke_ladder_trains_scores_reports_and_resumes(
    starter_micro: Any, ray_local: Any, tmp_path: Path, isolated_mlflow: str, capsys: pytest.CaptureFixture
) -> None:
    import mlflow

    config = _smoke_config(tmp_path, starter_micro)
    results = tmp_path / "results"
    assert main(["experiment", "run", str(config), "--results", str(results), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    # Every (variant, seed) trained with the shared budget and was scored on the held-out prompts.
    assert [v["name"] for v in summary["variants"]] == ["raw", "causal_concat"]
    for v in summary["variants"]:
        assert v["seeds"] == [0, 1] and v["n_images"] == 12
        assert 0.0 <= v["metrics"]["overall"]["mean"] <= 1.0
    assert summary["budget"] == {"steps": 2, "batch_size": 8, "seeds": [0, 1]}
    assert summary["cache"]["rows"] == 240

    # Report files: table with both rows, JSON equal to the summary's variants, plot and sample grid.
    table = (results / "ladder.md").read_text()
    assert "| `raw` | llama_noinst | 2 |" in table and "| `causal_concat` | llama, qwen2 | 2 |" in table
    assert "38.72" in table and "2 steps x batch 8" in table
    assert json.loads((results / "ladder.json").read_text())["variants"] == summary["variants"]
    assert (results / "ladder_by_position.png").stat().st_size > 0
    assert (results / "ladder_samples.png").stat().st_size > 0

    # Each (variant, seed) is an MLflow run with its eval metrics and tags; the exported pipeline carries the
    # variant's switches and encoders (the no-instruction encoder has an empty instruction).
    work = tmp_path / "work"
    client = mlflow.MlflowClient(isolated_mlflow)
    exp = client.get_experiment_by_name("smoke-ladder")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`lidit.experiment.variant` != ''")
    assert sorted(
        (r.data.tags["lidit.experiment.variant"], r.data.tags["lidit.experiment.seed"]) for r in runs
    ) == [
        ("causal_concat", "0"),
        ("causal_concat", "1"),
        ("raw", "0"),
        ("raw", "1"),
    ]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert 0.0 <= r.data.metrics["eval.overall"] <= 1.0
        assert r.data.params["steps"] == "2" and r.data.params["seed"] == r.data.tags["lidit.experiment.seed"]

    def exported(variant: str, seed: int) -> Path:
        return Path(json.loads((work / "results" / variant / f"seed{seed}.json").read_text())["pipeline"])

    raw = json.loads((exported("raw", 0) / "pipeline.json").read_text())
    assert [e["name"] for e in raw["encoders"]] == ["llama_noinst"] and raw["encoders"][0][
        "instruction"
    ] == ""
    gen = json.loads((exported("raw", 0) / "generator" / "config.json").read_text())
    assert gen["refiner_depth"] == 0
    gen = json.loads((exported("causal_concat", 1) / "generator" / "config.json").read_text())
    assert gen["refiner_causal"] is True and gen["fusion"] == "concat"
    assert [e["name"] for e in gen["encoders"]] == ["llama", "qwen2"]

    # Running again continues from the result files: nothing is trained twice, the table is the same.
    n_runs = len(client.search_runs([exp.experiment_id]))
    assert main(["experiment", "run", str(config), "--results", str(tmp_path / "again"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["variants"] == summary["variants"]
    assert len(client.search_runs([exp.experiment_id])) == n_runs + 1  # only the new summary run


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
