from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from lidit.config import (
    ConfigError,
    StrictModel,
    lidit_home,
    load_config,
    mlflow_tracking_uri,
    parse_overrides,
)


class Inner(StrictModel):
    preset: str = "tiny"
    steps: int = Field(10, gt=0)


class Outer(StrictModel):
    name: str = "run"
    model: Inner = Inner()
    tags: list[str] = []


def test_yaml_plus_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("name: base\nmodel:\n  preset: S\n")
    cfg = load_config(Outer, f, ["model.steps=25", "tags=[a, b]"])
    assert cfg == Outer(name="base", model=Inner(preset="S", steps=25), tags=["a", "b"])


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.stpes: unknown key"):
        load_config(Outer, None, ["model.stpes=3"])


def test_bad_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"model\.steps: .*greater than 0.*got -1"):
        load_config(Outer, None, ["model.steps=-1"])


def test_malformed_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["model.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, tmp_path / "list.yaml")


def test_lidit_home_and_mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIDIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert lidit_home() == (tmp_path / "home").resolve() and lidit_home().is_dir()
    assert mlflow_tracking_uri() == f"sqlite:///{(tmp_path / 'home' / 'mlflow' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert mlflow_tracking_uri() == "http://127.0.0.1:5000"


def test_env_vars_expand_in_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One policy (lidit.config.expand_vars): `${VAR}` in values, after overrides; a bare `$` is text."""
    monkeypatch.setenv("LIDIT_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("RUN_NAME", "exp1")
    f = tmp_path / "c.yaml"
    f.write_text(
        "# ${NOT_SET} in a comment is never read\nname: ${RUN_NAME}-$RUN_NAME\ntags: ['${LIDIT_HOME}/cache']\n"
    )
    cfg = load_config(Outer, f, ["tags=['${RUN_NAME}/x']"])
    assert cfg.name == "exp1-$RUN_NAME"
    assert cfg.tags == ["exp1/x"]
    assert load_config(Outer, f).tags == [f"{(tmp_path / 'h').resolve()}/cache"]
    f.write_text("name: ${NOT_SET}/run\n")
    with pytest.raises(ConfigError, match=r"\$\{NOT_SET\} but the environment variable is not set"):
        load_config(Outer, f)
