"""Serving fixtures: a tiny model registered twice in a real MLflow store, and real Serve on 127.0.0.1.

Serve starts once per session with two applications: `main` (registry alias, no auth, the hot-swap target)
and `strict` (local export dir, bearer auth, tiny admission bound for the overload test).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port
from tests.serving.export import build_export, build_shared_assets, register_exports

MODEL_NAME = "lidit-serve-test"
API_KEY = "test-key-123"
ADMIN_KEY = "test-admin-key-456"


@dataclass
class Registry:
    root: Path
    exports: list[Path]
    versions: list[str]
    tracking_uri: str
    models_root: Path  # where the exports' lidit-models:// locations resolve (not where they were exported)


@pytest.fixture(scope="session")
def serving_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Two exports (generator seeds 1 and 2) registered as versions of MODEL_NAME; v1 is @production."""
    root = tmp_path_factory.mktemp("serving")
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # Set before Ray starts so every replica inherits them.
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("LIDIT_HOME", str(root / "home"))
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    encoders, vae = build_shared_assets(root / "assets")
    exports = [build_export(root / f"export{s}", encoders, vae, seed=s, models_root=root) for s in (1, 2)]
    versions = register_exports(exports, MODEL_NAME)
    # Portable exports: the LLMs and the VAE move to another models root after export, as on a serving
    # machine whose model directory lives elsewhere; every app below is configured with the new root.
    models_root = root / "elsewhere"
    models_root.mkdir()
    (root / "assets").rename(models_root / "assets")
    yield Registry(root, exports, versions, uri, models_root)
    mp.undo()


@dataclass
class Served:
    url: str  # main app
    strict_url: str  # auth + tiny queue app
    registry: Registry


def small_resources() -> list[str]:
    return [
        "deployments.encoder.num_cpus=0.25",
        "deployments.generator.num_cpus=0.5",
        "deployments.ingress.num_cpus=0.1",
        "limits.max_side=128",
        "limits.default_steps=4",
        "limits.max_steps=40",
        "auth.api_key_env=LIDIT_TEST_UNSET_KEY",  # auth off unless a test app sets a key file
        "admin.key_env=LIDIT_TEST_UNSET_ADMIN_KEY",  # no admin key unless a test app sets a key file
    ]


@pytest.fixture(scope="session")
def served(serving_registry: Registry, request: pytest.FixtureRequest) -> Iterator[Served]:
    request.getfixturevalue("ray_local")  # after the env above is set
    from ray import serve

    from lidit.config import load_config
    from serving.config import ServeConfig
    from serving.deploy import deploy

    reg = serving_registry
    port = free_port()
    key_file = reg.root / "api_key"
    key_file.write_text(API_KEY + "\n")
    main_cfg = load_config(
        ServeConfig,
        None,
        [
            f"model=models:/{MODEL_NAME}@production",
            f"models_dir={reg.root / 'models'}",
            f"models_root={reg.models_root}",
            "app_name=main",
            f"port={port}",
            *small_resources(),
        ],
    )
    strict_cfg = load_config(
        ServeConfig,
        None,
        [
            f"model={reg.exports[0]}",
            f"models_root={reg.models_root}",
            "app_name=strict",
            "route_prefix=/strict",
            f"port={port}",
            *small_resources(),
            f"auth.api_key_file={key_file}",
            # What the app reasons on when it decides whether admin endpoints are on: a non-loopback bind
            # with no admin key turns them off. (Serve's proxy itself binds 127.0.0.1, set by serve.start.)
            "host=0.0.0.0",
            "queue.max_inflight=2",
            "queue.retry_after_s=2",
        ],
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # Both apps deploy in parallel (halves fixture time on a busy 2-core box), from a Serve config as
        # `lidit serve` and the RayService do.
        deploy([main_cfg, strict_cfg])
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
        yield Served(base, f"{base}/strict", reg)
    finally:
        serve.shutdown()
