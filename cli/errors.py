"""Operational failures -> one line saying what failed and what to do (exit code 1); bugs keep tracebacks.

Exception types of heavy libraries are looked up in `sys.modules` only: if a library was never imported, its
exception cannot have been raised, and `lidit --help` must not pay for importing it.
"""

from __future__ import annotations

import sys

from cli.common import CommandError


def _type(module: str, name: str) -> type | None:
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def operational_error(exc: BaseException) -> CommandError | None:
    """The one-line form of `exc` when it is an operational failure, else None (a bug: keep the traceback)."""
    if isinstance(exc, CommandError):
        return exc
    cache_missing = _type("lidit.cache.reader", "CacheNotFoundError")
    if cache_missing and isinstance(exc, cache_missing):
        return CommandError(
            str(exc), "build it with `lidit cache build CONFIG.yaml`, or check the path/version"
        )
    location = _type("lidit.locations", "ModelLocationError")
    if location and isinstance(exc, location):
        return CommandError(str(exc), "copy the model there, or change the models root")
    mismatch = _type("lidit.pipeline", "FingerprintMismatchError")
    if mismatch and isinstance(exc, mismatch):
        return CommandError(str(exc), "serve with the encoders and VAE the version was trained on")
    transport = _type("httpx", "TransportError")
    if transport and isinstance(exc, transport):
        request = getattr(exc, "_request", None)
        where = (
            f"{request.url.scheme}://{request.url.netloc.decode()}" if request is not None else "the server"
        )
        return CommandError(
            f"cannot reach {where} ({type(exc).__name__}: {exc})",
            "is the server running? start one with `lidit serve CONFIG.yaml`, or check --url",
        )
    mlflow_error = _type("mlflow.exceptions", "MlflowException")
    if (
        mlflow_error
        and isinstance(exc, mlflow_error)
        and getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"
    ):
        return CommandError(
            f"MLflow: {exc.message}",  # type: ignore[attr-defined]
            "train and register one with `lidit train CONFIG.yaml`, or check the model URI and MLFLOW_TRACKING_URI",
        )
    return None
