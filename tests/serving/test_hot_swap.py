"""Hot swap under continuous requests: move the MLflow alias, reload, zero failed requests, version switches."""

from __future__ import annotations

import threading
import time

import httpx

from lidit.registry import set_alias
from serving.client import reload
from tests.serving.conftest import MODEL_NAME, Served

IMAGES = "/v1/images/generations"
REQ = {"prompt": "a red circle", "size": "32x32", "seed": 9, "num_inference_steps": 2}


def _version_and_png(url: str) -> tuple[str, str]:
    r = httpx.post(url + IMAGES, json=REQ, timeout=120)
    assert r.status_code == 200, r.text
    return r.headers["x-lidit-model-version"], r.json()["data"][0]["b64_json"]


def test_hot_swap_under_load_has_zero_failures_and_switches_version(served: Served) -> None:
    v1, v2 = served.registry.versions
    old_label, old_png = _version_and_png(served.url)
    assert old_label == f"{MODEL_NAME}/{v1}"

    results: list[tuple[float, float, int, str]] = []  # (start, end, status, version)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                r = c.post(served.url + IMAGES, json=REQ)
                results.append(
                    (t0, time.monotonic(), r.status_code, r.headers.get("x-lidit-model-version", ""))
                )

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        set_alias(MODEL_NAME, "production", v2)
        swap = reload(served.url)
        swapped_at = time.monotonic()
        assert swap == {"previous": old_label, "current": f"{MODEL_NAME}/{v2}", "changed": True}
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()

    statuses = [s for _, _, s, _ in results]
    assert statuses.count(200) == len(results), f"failed requests: {[s for s in statuses if s != 200]}"
    versions = [v for *_, v in sorted(results)]
    assert versions[0] == old_label and versions[-1] == f"{MODEL_NAME}/{v2}"
    # every request that started after reload() returned saw the new version
    assert all(v == f"{MODEL_NAME}/{v2}" for t0, _, _, v in results if t0 > swapped_at)
    assert len(results) >= 6
    new_label, new_png = _version_and_png(served.url)
    assert new_label == f"{MODEL_NAME}/{v2}" and new_png != old_png  # same seed, other weights

    # a reload with nothing changed is a no-op; moving the alias back swaps back (rollback)
    assert reload(served.url)["changed"] is False
    set_alias(MODEL_NAME, "production", v1)
    assert reload(served.url)["current"] == old_label
    assert _version_and_png(served.url) == (old_label, old_png)
    # an explicit version of the same model works (rollback/promote); another model or a path does not
    assert reload(served.url, model=f"models:/{MODEL_NAME}/{v1}")["current"] == old_label
    r = httpx.post(served.url + "/admin/reload", json={"model": str(served.registry.exports[1])}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
