"""Two ingress + two generator replicas: reload under load, and a killed ingress replica's replacement.

The served version is Serve `user_config` (cluster state): after a reload, every replica, including one Serve
starts later to replace a dead one, serves the new version. The app is deployed for this module only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from lidit.registry import set_alias
from serving.client import reload
from tests.serving.conftest import ADMIN_KEY, API_KEY, MODEL_NAME, Served, small_resources

IMAGES = "/v1/images/generations"
REQ = {"prompt": "a red circle", "size": "32x32", "seed": 9, "num_inference_steps": 2}
APP = "multi"
CLIENT = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Call:
    start: float
    end: float
    status: int
    version: str


@pytest.fixture(scope="module")
def multi_url(served: Served) -> Iterator[str]:
    from lidit.config import load_config
    from serving.config import ServeConfig
    from serving.deploy import delete, deploy

    port = served.url.rsplit(":", 1)[1]
    (served.registry.root / "admin_key").write_text(ADMIN_KEY + "\n")
    cfg = load_config(
        ServeConfig,
        None,
        [
            f"model=models:/{MODEL_NAME}@production",
            f"models_dir={served.registry.root / 'models'}",
            f"models_root={served.registry.models_root}",
            f"app_name={APP}",
            f"route_prefix=/{APP}",
            f"port={port}",
            *small_resources(),
            f"auth.api_key_file={served.registry.root / 'api_key'}",
            f"admin.key_file={served.registry.root / 'admin_key'}",
            "deployments.ingress.num_replicas=2",
            "deployments.generator.num_replicas=2",
            "deployments.generator.num_cpus=0.4",
            "admin.switch_delay_s=1.5",
        ],
    )
    deploy([cfg])
    try:
        yield f"{served.url}/{APP}"
    finally:
        set_alias(MODEL_NAME, "production", served.registry.versions[0])  # other modules expect v1
        delete(APP)


class Load:
    """Closed-loop clients recording (start, end, status, version) of every request."""

    def __init__(self, url: str, clients: int) -> None:
        self.calls: list[Call] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(url,)) for _ in range(clients)]

    def _client(self, url: str) -> None:
        with httpx.Client(timeout=120, headers=CLIENT) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post(url + IMAGES, json=REQ)
                    status, version = r.status_code, r.headers.get("x-lidit-model-version", "")
                except httpx.HTTPError:
                    status, version = 0, ""
                self.calls.append(Call(t0, time.monotonic(), status, version))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def _ingress_replicas() -> dict[str, str]:
    """replica id -> actor name of the RUNNING Ingress replicas of the app."""
    from serving.deploy import _client

    deployment = _client().get_serve_details()["applications"][APP]["deployments"]["Ingress"]
    return {r["replica_id"]: r["actor_name"] for r in deployment["replicas"] if r["state"] == "RUNNING"}


def test_reload_under_load_then_a_replacement_ingress_serves_the_reloaded_version(
    served: Served, multi_url: str
) -> None:
    import ray

    v1, v2 = (f"{MODEL_NAME}/{v}" for v in served.registry.versions)
    assert len(_ingress_replicas()) == 2
    with Load(multi_url, clients=3) as load:
        time.sleep(2)
        set_alias(MODEL_NAME, "production", served.registry.versions[1])
        assert reload(multi_url, api_key=ADMIN_KEY) == {"previous": v1, "current": v2, "changed": True}
        reloaded_at = time.monotonic()
        time.sleep(2)
    calls = sorted(load.calls, key=lambda c: c.start)
    assert len(calls) >= 6
    assert [c.status for c in calls].count(200) == len(calls), [c.status for c in calls if c.status != 200]
    assert {c.version for c in calls} == {v1, v2}  # nothing else, and the switch happened under load
    # never back: no request that started after a v2 response had ended got v1 (two ingress replicas agree)
    first_v2_end = min(c.end for c in calls if c.version == v2)
    assert all(c.version == v2 for c in calls if c.start > first_v2_end)
    assert all(c.version == v2 for c in calls if c.start > reloaded_at)

    # Kill one ingress replica mid-load; Serve starts a replacement, which gets the reloaded user_config.
    before = _ingress_replicas()
    victim_id, victim_actor = next(iter(before.items()))
    with Load(multi_url, clients=3) as load:
        time.sleep(1)
        ray.kill(ray.get_actor(victim_actor, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        deadline = time.monotonic() + 240
        while True:
            now = _ingress_replicas()
            new = set(now) - set(before)
            if new and len(now) == 2:
                break
            assert time.monotonic() < deadline, f"no replacement ingress replica: {now}"
            time.sleep(0.5)
        replaced_at = time.monotonic()
        (new_id,) = new
        # Ask until the replacement itself answers (the proxy spreads requests over both replicas).
        seen: dict[str, str] = {}
        while new_id not in seen:
            assert time.monotonic() < deadline, f"replacement {new_id} never answered; saw {seen}"
            body = httpx.get(multi_url + "/readyz", timeout=60).json()  # probes need no key
            seen[body["replica"]] = body["version"]
        time.sleep(2)
    assert victim_id not in seen
    assert seen[new_id] == v2, seen  # the replacement serves the reloaded version, not the deploy-time one
    after = [c for c in load.calls if c.start > replaced_at]
    assert after and all(c.status == 200 and c.version == v2 for c in after)
    # every answered request, before, during and after the kill, came from the current version
    assert all(c.version == v2 for c in load.calls if c.status == 200)
    failed = [c for c in load.calls if c.status != 200]
    assert all(c.start < replaced_at for c in failed)  # only requests caught on the dying replica
    print(
        f"kill: {len(failed)} of {len(load.calls)} requests failed, replacement after "
        f"{replaced_at - killed_at:.1f} s"
    )


def test_admin_endpoints_take_only_the_admin_key(multi_url: str) -> None:
    """The image clients' key gets 403 on admin endpoints; no key or a wrong one 401; the admin key works."""
    r = httpx.post(multi_url + "/admin/reload", headers=CLIENT, timeout=60)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(multi_url + "/admin/reload", headers=headers, timeout=60)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    # and the admin key is no image key: admin and clients are separate credentials
    r = httpx.post(multi_url + IMAGES, json=REQ, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert r.status_code == 401
    assert reload(multi_url, api_key=ADMIN_KEY)["changed"] is False
