"""Real Serve over HTTP: images, n, seeds, batching, LRU, validation table, models/health endpoints."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving.conftest import MODEL_NAME, Served

IMAGES = "/v1/images/generations"


def _post(url: str, body: dict | bytes, **kw) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(url + IMAGES, json=body, timeout=120, **kw)
    return httpx.post(
        url + IMAGES, content=body, headers={"content-type": "application/json"}, timeout=120, **kw
    )


def _images(resp: httpx.Response) -> list[np.ndarray]:
    assert resp.status_code == 200, resp.text
    out = []
    for d in resp.json()["data"]:
        png = base64.b64decode(d["b64_json"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        im = Image.open(io.BytesIO(png))
        im.load()
        out.append(np.asarray(im.convert("RGB")))
    return out


def test_request_returns_pngs_of_requested_size_and_n(served: Served) -> None:
    resp = _post(
        served.url,
        {"model": MODEL_NAME, "prompt": "a red circle", "n": 3, "size": "48x32", "seed": 5},
    )
    body = resp.json()
    assert set(body) == {"created", "model_version", "data"} and isinstance(body["created"], int)
    assert body["model_version"] == resp.headers["x-lidit-model-version"]
    images = _images(resp)
    assert len(images) == 3
    assert all(im.shape == (32, 48, 3) for im in images)
    assert [d["seed"] for d in body["data"]] == [5, 6, 7]
    assert not np.array_equal(images[0], images[1])  # each image its own seed
    assert resp.headers["x-lidit-model-version"].startswith(f"{MODEL_NAME}/")


def test_fixed_seed_is_deterministic(served: Served) -> None:
    req = {"prompt": "two blue squares", "size": "32x32", "seed": 42, "num_inference_steps": 3}
    a, b = _images(_post(served.url, req))[0], _images(_post(served.url, req))[0]
    c = _images(_post(served.url, {**req, "seed": 43}))[0]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # negative prompt and guidance are honoured (they change the image)
    d = _images(_post(served.url, {**req, "negative_prompt": "a yellow circle"}))[0]
    e = _images(_post(served.url, {**req, "guidance_scale": 1.0}))[0]
    assert not np.array_equal(a, d) and not np.array_equal(a, e)


def test_concurrent_requests_are_batched_and_match_sequential(served: Served) -> None:
    from ray import serve

    gen = serve.get_deployment_handle("Generator", app_name="main")
    before = gen.stats.remote().result()
    reqs = [{"prompt": f"a red circle number {i}", "size": "32x32", "seed": i} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        batched = [_images(r)[0] for r in pool.map(lambda r: _post(served.url, r), reqs)]
    after = gen.stats.remote().result()
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8  # some requests shared a sampler call
    alone = _images(_post(served.url, reqs[3]))[0]
    # batch-mates only add padding: identical up to float rounding of one 8-bit level
    assert np.abs(alone.astype(int) - batched[3].astype(int)).max() <= 1


def test_text_encoder_lru_reuses_prompt_states(served: Served) -> None:
    from ray import serve

    enc = serve.get_deployment_handle("TextEncoder", app_name="main")
    req = {"prompt": "three orange circles below a square", "size": "32x32", "seed": 1}
    _images(_post(served.url, req))
    s1 = enc.stats.remote().result()
    _images(_post(served.url, req))
    s2 = enc.stats.remote().result()
    assert s2["hits"] - s1["hits"] == 2  # one per LLM
    assert s2["misses"] == s1["misses"]


LONG_TOKENS = "a red circle to the left of a blue square " * 20  # < 1000 chars, > 128 tokens

BAD_REQUESTS = [
    # (case, body, status, param, message fragment)
    ("not json", b"{nope", 400, None, "not valid JSON"),
    ("json list", b"[1, 2]", 400, None, "JSON object"),
    ("missing prompt", {"n": 1}, 400, "prompt", "missing required parameter"),
    ("empty prompt", {"prompt": "   "}, 400, "prompt", "must not be empty"),
    ("prompt too many chars", {"prompt": "x" * 1001}, 400, "prompt", "more than 1000"),
    ("prompt too many tokens", {"prompt": LONG_TOKENS}, 400, "prompt", "tokens"),
    ("prompt wrong type", {"prompt": 3}, 400, "prompt", "invalid"),
    ("n zero", {"prompt": "a", "n": 0}, 400, "n", "n must be in 1..4"),
    ("n too big", {"prompt": "a", "n": 5}, 400, "n", "n must be in 1..4"),
    ("n as string", {"prompt": "a", "n": "2"}, 400, "n", "invalid"),
    ("size no x", {"prompt": "a", "size": "64"}, 400, "size", "WIDTHxHEIGHT"),
    ("size letters", {"prompt": "a", "size": "axb"}, 400, "size", "WIDTHxHEIGHT"),
    ("size too large", {"prompt": "a", "size": "1024x1024"}, 400, "size", "1..128"),
    ("size not a multiple", {"prompt": "a", "size": "30x30"}, 400, "size", "multiples of 4"),
    ("steps zero", {"prompt": "a", "num_inference_steps": 0}, 400, "num_inference_steps", "1..40"),
    ("steps too many", {"prompt": "a", "num_inference_steps": 1000}, 400, "num_inference_steps", "1..40"),
    ("guidance NaN", b'{"prompt": "a", "guidance_scale": NaN}', 400, "guidance_scale", "finite"),
    ("guidance inf", b'{"prompt": "a", "guidance_scale": Infinity}', 400, "guidance_scale", "finite"),
    ("guidance negative", {"prompt": "a", "guidance_scale": -1}, 400, "guidance_scale", "finite"),
    ("guidance string", {"prompt": "a", "guidance_scale": "high"}, 400, "guidance_scale", "invalid"),
    ("seed negative", {"prompt": "a", "seed": -1}, 400, "seed", "seed must be"),
    ("seed float", {"prompt": "a", "seed": 1.5}, 400, "seed", "invalid"),
    ("unknown model", {"prompt": "a", "model": "dall-e-3"}, 404, "model", "does not exist"),
    ("url format", {"prompt": "a", "response_format": "url"}, 400, "response_format", "invalid"),
    ("unknown field", {"prompt": "a", "quality": "hd"}, 400, "quality", "unknown parameter"),
    ("body too large", {"prompt": "a", "user": "u" * 70000}, 413, None, "larger than"),
]


@pytest.mark.parametrize(
    "body,status,param,fragment", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_input_gets_its_4xx(served: Served, body, status: int, param, fragment: str) -> None:
    resp = _post(served.url, body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    assert fragment in err["message"]
    assert err["type"] == "invalid_request_error"


def test_routing_errors_are_openai_shaped_and_server_stays_healthy(served: Served) -> None:
    r = httpx.get(served.url + IMAGES, timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(served.url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(served.url + "/healthz", timeout=30).json() == {"status": "ok"}
    ready = httpx.get(served.url + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert len(_images(_post(served.url, {"prompt": "a red circle", "size": "32x32"}))) == 1


def test_models_endpoint_lists_served_name_and_version(served: Served) -> None:
    body = httpx.get(served.url + "/v1/models", timeout=30).json()
    assert body["object"] == "list"
    (entry,) = body["data"]
    assert entry["id"] == MODEL_NAME
    assert entry["version"].startswith(f"{MODEL_NAME}/")
    assert json.dumps(body)  # plain JSON


@pytest.mark.parametrize("negative", [None, "a yellow circle"])
def test_served_image_equals_the_pipeline_call(served: Served, negative: str | None) -> None:
    """One CFG / sampling path: the server's image is `LiDiTPipeline.__call__`'s for the same inputs."""
    from lidit.pipeline import LiDiTPipeline

    req = {"prompt": "two blue squares", "size": "32x32", "seed": 21, "num_inference_steps": 3}
    if negative:
        req["negative_prompt"] = negative
    served_image = _images(_post(served.url, req))[0]
    # main serves version 1 = export 0
    pipe = LiDiTPipeline.from_pretrained(served.registry.exports[0], models_root=served.registry.models_root)
    local = pipe(
        "two blue squares", negative, num_inference_steps=3, guidance_scale=4.0, seed=21, height=32, width=32
    )[0]
    assert np.abs(np.asarray(local.convert("RGB")).astype(int) - served_image.astype(int)).max() <= 1
