"""HTTP client for a running LI-DiT server (httpx only: no Ray, no torch)."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import httpx

from serving.api import IMAGES_PATH, RELOAD_PATH


class ServerError(RuntimeError):
    """A non-2xx answer; `status` and the OpenAI error `body` are kept for the caller."""

    def __init__(self, status: int, body: Any) -> None:
        msg = body.get("error", {}).get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {msg}")
        self.status, self.body = status, body


def _headers(api_key: str | None) -> dict[str, str]:
    key = api_key or os.environ.get("LIDIT_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _check(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    if resp.status_code >= 400:
        raise ServerError(resp.status_code, body)
    return body


def generate(
    url: str,
    prompt: str,
    n: int = 1,
    size: str | None = None,
    seed: int | None = None,
    api_key: str | None = None,
    timeout: float = 300.0,
    **extra: Any,
) -> list[bytes]:
    """POST one generation request; returns the PNG bytes of each image."""
    payload: dict[str, Any] = {"prompt": prompt, "n": n, "response_format": "b64_json"}
    if size:
        payload["size"] = size
    if seed is not None:
        payload["seed"] = seed
    payload.update({k: v for k, v in extra.items() if v is not None})
    resp = httpx.post(url.rstrip("/") + IMAGES_PATH, json=payload, headers=_headers(api_key), timeout=timeout)
    return [base64.b64decode(d["b64_json"]) for d in _check(resp)["data"]]


def reload(url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600.0) -> dict:
    """Ask the server to re-resolve its model alias (or switch to `model`) and hot-swap.

    `api_key` is the admin key (default $LIDIT_ADMIN_KEY, else $LIDIT_API_KEY for a loopback server).
    """
    body = {"model": model} if model else None
    key = api_key or os.environ.get("LIDIT_ADMIN_KEY")
    resp = httpx.post(url.rstrip("/") + RELOAD_PATH, json=body, headers=_headers(key), timeout=timeout)
    return _check(resp)


def save_pngs(images: list[bytes], out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, png in enumerate(images):
        path = out / f"{stem}_{k}.png"
        path.write_bytes(png)
        paths.append(path)
    return paths
