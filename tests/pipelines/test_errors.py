"""Build errors: a config error is one line and exit 2; a bug keeps its traceback (exit 1); never one for the other."""

from __future__ import annotations

import pytest
import yaml

from cli.main import main as lidit_main
from pipelines.build import main as build_main
from tests.pipelines.conftest import cache_config


def _config(cache_starter, tmp_path, **overrides) -> str:
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(cache_config(cache_starter, tmp_path / "cache", **overrides)))
    return str(path)


def _stderr_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.mark.parametrize(
    "overrides, names",
    [
        ({"sources": [{"uri": "/nonexistent/data.parquet"}]}, "sources"),
        ({"vae": "/nonexistent/vae"}, "vae"),
    ],
)
def test_config_error_is_one_line_exit_2(cache_starter, tmp_path, capsys, overrides, names):
    cfg = _config(cache_starter, tmp_path, **overrides)
    assert build_main([cfg]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "config error" in lines[0] and names in lines[0], lines
    assert lidit_main(["cache", "build", cfg]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "config error" in lines[0] and names in lines[0], lines


def test_missing_source_column_is_config_error(cache_starter, tmp_path, capsys):
    cfg = _config(
        cache_starter, tmp_path, sources=[{"uri": str(cache_starter.train_parquet), "caption_column": "text"}]
    )
    assert build_main([cfg]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "no column 'text'" in lines[0], lines


def test_bug_keeps_its_traceback(cache_starter, tmp_path, monkeypatch):
    """A ValueError from inside the build (here injected into source discovery) is a bug, not a config error."""
    import pipelines.plan

    def broken(*args, **kwargs):
        raise ValueError("boom: a bug in discovery")

    monkeypatch.setattr(pipelines.plan, "discover", broken)
    cfg = _config(cache_starter, tmp_path)
    with pytest.raises(ValueError, match="boom"):
        build_main([cfg])
    with pytest.raises(ValueError, match="boom"):
        lidit_main(["cache", "build", cfg])
