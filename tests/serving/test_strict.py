"""Auth (401) and overload (503 + Retry-After, then recovery) on the `strict` app: auth on, max_inflight=2."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.serving.conftest import API_KEY, Served

IMAGES = "/v1/images/generations"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_missing_or_wrong_token_gets_401(served: Served) -> None:
    body = {"prompt": "a red circle", "size": "32x32", "num_inference_steps": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + API_KEY}):
        r = httpx.post(served.strict_url + IMAGES, json=body, headers=headers, timeout=60)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(served.strict_url + "/v1/models", timeout=60).status_code == 401
    # no admin key and a non-loopback bind: admin endpoints are off, whatever key is sent
    for headers in ({}, AUTH):
        r = httpx.post(served.strict_url + "/admin/reload", headers=headers, timeout=60)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled", r.text
        assert "LIDIT_TEST_UNSET_ADMIN_KEY" in r.json()["error"]["message"]
    # probes stay open for the orchestrator; the right key works
    assert httpx.get(served.strict_url + "/healthz", timeout=60).status_code == 200
    r = httpx.post(served.strict_url + IMAGES, json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1
    models = httpx.get(served.strict_url + "/v1/models", headers=AUTH, timeout=60).json()
    assert models["data"][0]["id"] == "export1"  # a local export is served under its directory name


def test_overload_gets_503_with_retry_after_and_recovers(served: Served) -> None:
    body = {"prompt": "two green triangles", "size": "64x64", "num_inference_steps": 20, "n": 2}

    def call(_: int) -> httpx.Response:
        return httpx.post(served.strict_url + IMAGES, json=body, headers=AUTH, timeout=300)

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(call, range(10)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "2"
    assert rejected.json()["error"]["code"] == "overloaded"
    # recovers: the backlog is gone, the next request is served
    r = httpx.post(served.strict_url + IMAGES, json={**body, "n": 1}, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    assert httpx.get(served.strict_url + "/readyz", timeout=60).status_code == 200
