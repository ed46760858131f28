"""Deploy the app declaratively and change its replicas' `user_config`: Serve's controller holds the state.

Why declarative (a Serve config naming `serving.app:app_builder`, as `serve deploy` and KubeRay's RayService do)
and not `serve.run(app)`: only a declarative app can change one deployment's `user_config` in place. Serve
then calls `reconfigure` on the running replicas (no restart) and on every replica started later; an
imperative redeploy gets a fresh random code version and replaces every replica.

Serve's public Python API has no call for "apply this config"; `_get_global_client().deploy_apps` is what
`serve deploy` ends in (through the dashboard's REST API, which a local Ray started here does not run). It is
kept to this module. Applying a config replaces the whole set of declarative apps, so every change reads the
deployed set first and changes only its own app (two reloads of different apps at the same instant could still
race; one reload per app at a time is serialised by the ingress).
"""

from __future__ import annotations

import os
import time
from typing import Any

from serving.config import ServeConfig

APP_BUILDER = "serving.app:app_builder"


class DeployError(RuntimeError):
    """The app did not reach RUNNING: the message says what Serve reported and what to try."""


# Where the deploying process finds its models. The app's builder task and its replicas run in workers of a Ray
# that may have been started earlier, with another environment (a test session's Ray, another command's):
# without these they resolve `models:/` against that environment's MLflow store and find nothing (and
# `lidit-models://` encoder/VAE locations against its models root).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "LIDIT_HOME", "LIDIT_MODELS_ROOT")


def app_config(cfg: ServeConfig) -> dict[str, Any]:
    """The declarative application entry for `cfg` (the whole config travels as JSON in the builder args)."""
    entry: dict[str, Any] = {
        "name": cfg.app_name,
        "route_prefix": cfg.route_prefix,
        "import_path": APP_BUILDER,
        "args": {"config_json": cfg.model_dump_json()},
        "logging_config": {"enable_access_log": cfg.logs.access_log != "disabled"},
    }
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if env:
        entry["runtime_env"] = {"env_vars": env}
    return entry


def _client() -> Any:
    from ray.serve.context import _get_global_client

    return _get_global_client()


def deployed_apps() -> dict[str, dict[str, Any]]:
    """Declarative apps as deployed now, by name (imperative `serve.run` apps have no config and are absent)."""
    details = _client().get_serve_details()
    return {
        name: app["deployed_app_config"]
        for name, app in details.get("applications", {}).items()
        if app.get("deployed_app_config")
    }


def _apply(apps: dict[str, dict[str, Any]]) -> None:
    from ray.serve.schema import ServeDeploySchema

    _client().deploy_apps(ServeDeploySchema.model_validate({"applications": list(apps.values())}))


def wait_running(names: list[str], timeout_s: float) -> None:
    """Block until every app in `names` is RUNNING; raise `DeployError` on failure or timeout."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        if all(s == "RUNNING" for s in states.values()):
            return
        for n, s in states.items():
            if s in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise DeployError(f"app {n!r} is {s}: {apps[n].message.strip().splitlines()[-1:]}")
        last = ", ".join(f"{n}={s}" for n, s in states.items())
        if time.monotonic() > deadline:
            raise DeployError(f"apps not running after {timeout_s:.0f} s ({last})")
        time.sleep(0.2)


def deploy(cfgs: list[ServeConfig], timeout_s: float = 600.0) -> None:
    """Deploy (or update) these apps beside the declarative apps already running; wait until all run."""
    apps = deployed_apps()
    for cfg in cfgs:
        apps[cfg.app_name] = app_config(cfg)
    _apply(apps)
    wait_running([c.app_name for c in cfgs], timeout_s)


def delete(app_name: str) -> None:
    """Remove one declarative app, keeping the others."""
    from ray import serve

    apps = deployed_apps()
    if apps.pop(app_name, None) is not None:
        _apply(apps)
    deadline = time.monotonic() + 60
    while app_name in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.2)


def set_user_configs(app_name: str, user_configs: dict[str, dict[str, Any]], timeout_s: float) -> None:
    """Give deployments of `app_name` new `user_config`s; returns once every replica has run `reconfigure`."""
    apps = deployed_apps()
    if app_name not in apps:
        raise DeployError(
            f"app {app_name!r} was not deployed from a config (lidit serve, serve deploy or a RayService), "
            "so its replicas' state cannot be changed in place"
        )
    app = apps[app_name]
    deployments = {d["name"]: d for d in app.get("deployments", [])}
    for name, user_config in user_configs.items():
        deployments.setdefault(name, {"name": name})["user_config"] = user_config
    app["deployments"] = list(deployments.values())
    _apply(apps)
    wait_running([app_name], timeout_s)
