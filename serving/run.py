"""Run the serving app until interrupted: `python -m serving CONFIG.yaml [--port N] [--set k=v]`.

Starts (or joins) Ray, binds Serve's HTTP proxy to `host:port` (127.0.0.1 by default), deploys the app, prints
the URL and waits; SIGINT/SIGTERM shut Serve (and a Ray this process started) down cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from lidit.config import ConfigError, load_config
from serving.config import ServeConfig


def serve_url(cfg: ServeConfig) -> str:
    """Base URL clients use (the route prefix included)."""
    prefix = cfg.route_prefix.rstrip("/")
    return f"http://{cfg.host}:{cfg.port}{prefix}"


def start(cfg: ServeConfig) -> str:
    """Deploy `cfg` on the current (or a new local) Ray; returns the base URL once the app is healthy."""
    from ray import serve

    from cluster import ensure_ray
    from lidit.registry import configure_mlflow
    from serving.deploy import deploy

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Read by Serve's controller and proxy, so they count only for a Ray started below (children inherit).
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(cfg.startup.proxy_ready_timeout_s))
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", str(cfg.startup.proxy_ready_timeout_s))
    if cfg.logs.access_log != "console":  # every request at INFO on the console drowns the server's own lines
        os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    if cfg.registered_name():
        configure_mlflow()  # sets MLFLOW_TRACKING_URI before Ray starts, so replicas inherit it
    ensure_ray(log_to_driver=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    # Declarative, so a reload can change the replicas' state in place (serving.deploy).
    deploy([cfg], timeout_s=cfg.startup.timeout_s)
    return serve_url(cfg)


def _startup_failures() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    from serving.deploy import DeployError

    return (RayError, RayServeException, DeployError, TimeoutError)


def startup_failure(exc: BaseException) -> str:
    """One line: what failed, and what to try."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    what = f"{type(exc).__name__}: {lines[0][:240] if lines else 'no message'}"
    return (
        f"{what}. Serve did not come up in time; on a busy machine retry when it is quieter, or raise "
        "--set startup.proxy_ready_timeout_s=... / startup.timeout_s=... (logs: the Ray session's logs/serve/)"
    )


def serve_forever(cfg: ServeConfig) -> int:
    """Start, print the URL, block until SIGINT/SIGTERM, then shut down."""
    import ray
    from ray import serve

    owned_ray = not ray.is_initialized()
    stop = threading.Event()
    failures = _startup_failures()  # Ray is imported lazily, so the tuple is built here

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            url = start(cfg)
        except failures as exc:  # operational: one line and what to try, never a traceback
            print(f"serving: could not start: {startup_failure(exc)}", file=sys.stderr, flush=True)
            return 1
        print(
            f"LI-DiT serving {cfg.model} at {url}  (POST {url}/v1/images/generations; Ctrl-C stops)",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print("shutting down ...", flush=True)
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        try:
            serve.shutdown()
        finally:
            if owned_ray and ray.is_initialized():
                ray.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help="HTTP port (overrides the config)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")


def config_from_args(path: str | None, args: argparse.Namespace) -> ServeConfig:
    overrides = list(args.set)
    if args.port is not None:
        overrides.append(f"port={args.port}")
    if args.host is not None:
        overrides.append(f"host={args.host}")
    return load_config(ServeConfig, path, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="serve config YAML (e.g. configs/starter/serve.yaml)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve_forever(config_from_args(args.config, args))
    except ConfigError as exc:
        print(f"serving: config error: {exc}", file=sys.stderr)
        return 2
