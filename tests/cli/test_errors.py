"""Operational failures: one line on stderr saying what failed and what to do, and a non-zero exit code."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cli.errors import operational_error
from cli.main import main
from tests.ports import free_port

SERVE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "starter" / "serve.yaml"


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err}"
    return lines[0]


def test_reload_against_a_dead_server_is_one_line(capsys: pytest.CaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["serve", "reload", "--url", url]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("lidit serve reload: cannot reach " + url) and "lidit serve CONFIG.yaml" in line


def test_generate_against_a_dead_server_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["generate", "--url", url, "--prompt", "a red circle", "--out", str(tmp_path)]) == 1
    assert "cannot reach " + url in _one_line(capsys.readouterr().err)


def test_cache_info_on_a_missing_cache_says_cache_missing(tmp_path: Path, capsys) -> None:
    assert main(["cache", "info", str(tmp_path / "nonexistent")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "no committed feature cache" in line and "lidit cache build" in line
    assert "config error" not in line


def test_serve_on_a_port_in_use_is_one_line(capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", str(SERVE_CONFIG), "--port", str(port)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"port {port} on 127.0.0.1 is in use" in line and "--port" in line


def test_serve_of_an_unregistered_model_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # an empty registry
    port = str(free_port())
    args = ["serve", str(SERVE_CONFIG), "--port", port, "--set", "model=models:/not-trained@production"]
    assert main(args) == 1
    line = _one_line(capsys.readouterr().err)
    assert "not-trained" in line and "not found" in line and "lidit train" in line


def test_serve_of_a_missing_export_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["serve", str(SERVE_CONFIG), "--port", str(free_port()), "--set", f"model={tmp_path}/gone"]
    assert main(args) == 1
    assert "no pipeline.json" in _one_line(capsys.readouterr().err)


def test_bugs_are_not_operational_errors() -> None:
    assert operational_error(RuntimeError("internal error")) is None
    assert operational_error(KeyError("x")) is None
