"""Metrics reach Ray's Prometheus endpoint: requests by status and version, latency, batches, served version."""

from __future__ import annotations

import re
import time

import httpx

from tests.serving.conftest import MODEL_NAME, Served

IMAGES = "/v1/images/generations"


def _scrape() -> str:
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    return httpx.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=30).text


def test_request_batch_and_version_metrics_are_exported(served: Served) -> None:
    assert httpx.post(
        served.url + IMAGES, json={"prompt": "a red circle", "size": "32x32"}, timeout=120
    ).is_success
    assert httpx.post(served.url + IMAGES, json={"prompt": "a", "n": 0}, timeout=120).status_code == 400
    wanted = [
        r'lidit_image_requests_total\{[^}]*status="200"',
        r'lidit_image_requests_total\{[^}]*status="400"',
        r"lidit_request_latency_seconds_bucket\{",
        r"lidit_batch_size_bucket\{[^}]*deployment=\"Generator\"",
        r"lidit_batch_size_bucket\{[^}]*deployment=\"TextEncoder\"",
        r"lidit_inflight_requests\{",
        r"lidit_batch_queue_depth\{",
        rf'lidit_model_version_info\{{[^}}]*model_version="{MODEL_NAME}/[0-9]+"[^}}]*\}} 1',
        r"lidit_images_generated_total\{",
    ]
    deadline = time.monotonic() + 120  # Ray's agent exports every few seconds
    while True:
        text = _scrape()
        missing = [w for w in wanted if not re.search(w, text)]
        if not missing:
            break
        assert time.monotonic() < deadline, f"not exported: {missing}"
        time.sleep(3)
