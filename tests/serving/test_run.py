"""`lidit serve` start-up: Serve given time on a loaded box, and a failed start is one line + exit 1."""

from __future__ import annotations

import pytest

from lidit.config import load_config
from serving import run
from serving.config import ServeConfig


def test_failed_start_is_one_line_and_exit_1(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from ray import serve
    from ray.exceptions import ActorDiedError

    def proxy_died(cfg: ServeConfig) -> str:  # what serve.start raised on the loaded box (issue 15)
        raise ActorDiedError()

    monkeypatch.setattr(run, "start", proxy_died)
    monkeypatch.setattr(serve, "shutdown", lambda: None)  # leave this session's Serve (other tests') alone
    assert run.serve_forever(load_config(ServeConfig, None, [])) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert (
        err.startswith("serving: could not start: ActorDiedError") and "startup.proxy_ready_timeout_s" in err
    )


def test_startup_and_log_settings() -> None:
    from serving.deploy import app_config

    cfg = load_config(ServeConfig, "configs/starter/serve.yaml", [])
    assert cfg.startup.proxy_ready_timeout_s >= 60 and cfg.startup.timeout_s >= 600  # not Serve's 5 s
    assert cfg.logs.access_log == "file"
    assert app_config(cfg)["logging_config"] == {"enable_access_log": True}
    off = load_config(ServeConfig, None, ["logs.access_log=disabled"])
    assert app_config(off)["logging_config"] == {"enable_access_log": False}


def test_the_app_carries_the_deploying_process_model_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray started earlier with another environment must still resolve `models:/` against this store."""
    from serving.deploy import app_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/somewhere/mlflow.db")
    monkeypatch.setenv("LIDIT_HOME", "/tmp/somewhere")
    cfg = load_config(ServeConfig, None, [])
    assert app_config(cfg)["runtime_env"] == {
        "env_vars": {
            "MLFLOW_TRACKING_URI": "sqlite:////tmp/somewhere/mlflow.db",
            "LIDIT_HOME": "/tmp/somewhere",
        }
    }
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("LIDIT_HOME")
    assert "runtime_env" not in app_config(cfg)
