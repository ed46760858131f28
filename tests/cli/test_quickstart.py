"""`lidit quickstart --train-config`: the recipe picks what is trained, served and scored; a bad recipe fails
before any stage runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main
from cli.quickstart import CONFIG_DIR, served_model
from lidit.config import ConfigError, load_config
from serving.config import ServeConfig
from training.config import TrainConfig


def test_the_served_model_is_the_version_the_recipe_registers() -> None:
    recipe = load_config(TrainConfig, CONFIG_DIR / "train_long_layout.yaml")
    serve_cfg = load_config(ServeConfig, CONFIG_DIR / "serve.yaml", served_model(recipe))
    assert serve_cfg.model == "models:/lidit-starter-long-layout@candidate"
    assert serve_cfg.default_model_name() == "lidit-starter-long-layout"
    default = load_config(TrainConfig, CONFIG_DIR / "train.yaml")
    assert load_config(ServeConfig, CONFIG_DIR / "serve.yaml", served_model(default)).model == (
        "models:/lidit-starter@production"
    )


def test_a_recipe_that_registers_nothing_cannot_be_served() -> None:
    recipe = load_config(TrainConfig, CONFIG_DIR / "train.yaml", ["tracking.registered_model=null"])
    with pytest.raises(ConfigError, match="set tracking.registered_model"):
        served_model(recipe)


def test_a_missing_recipe_fails_in_one_line_before_any_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("LIDIT_HOME", str(tmp_path / "home"))
    assert main(["quickstart", "--train-config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lidit quickstart: config error: config file not found: {tmp_path / 'nope.yaml'}"]
    assert not (tmp_path / "home" / "starter").exists()  # nothing built


def test_a_bad_starter_override_is_a_config_error_before_any_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("LIDIT_HOME", str(tmp_path / "home"))
    assert main(["quickstart", "--starter-set", "data.grid=-8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "lidit quickstart: config error: invalid StarterConfig config:"
    assert err[1:] == ["  data.grid: Input should be greater than or equal to 0 (got -8)"]
    assert not (tmp_path / "home" / "starter").exists()  # nothing built
