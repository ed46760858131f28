"""The FastAPI ingress: auth, body limit, validation, admission control, version pinning, reload.

The version it pins requests to is Serve `user_config` (`serving.state.ServedVersion`), so every ingress
replica, a restarted one included, serves what the controller says; `reload` changes it there.

Kept apart from the model deployments and free of torch imports, so its replica starts fast and stays small.
"""

import asyncio
import base64
import hmac
import json
import logging
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from lidit.registry import registered_name
from serving.api import (
    IMAGES_PATH,
    MODEL_VERSION_HEADER,
    MODELS_PATH,
    RELOAD_PATH,
    APIError,
    error_body,
    parse_request,
)
from serving.config import ServeConfig, hash_key, is_loopback
from serving.deploy import set_user_configs
from serving.metrics import IngressMetrics
from serving.refs import ModelRef, resolve_ref, tracking_uri_for
from serving.state import ENCODER, GENERATOR, INGRESS, ServedVersion, model_user_config

logger = logging.getLogger("ray.serve")

api = FastAPI(title="LI-DiT images API", version="1")


def _json_error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404 / 405 from routing, in the OpenAI error shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(
        error_body(str(exc.detail), "invalid_request_error", None, code),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP: auth, body limit, validation, admission control, version pinning and the reload endpoint."""

    def __init__(
        self,
        cfg: ServeConfig,
        encoder: DeploymentHandle,
        generator: DeploymentHandle,
        key_hash: str | None,
        admin_key_hash: str | None = None,
    ) -> None:
        self._cfg = cfg
        self._version: ServedVersion | None = None  # set by `reconfigure` before the first request
        self._encoder = encoder
        self._generator = generator
        self._key_hash = key_hash
        self._admin_key_hash = admin_key_hash
        self._admin_open = admin_key_hash is None and is_loopback(cfg.host)
        self._inflight = 0
        self._reload_lock = asyncio.Lock()
        self._name = cfg.default_model_name()
        self._created = int(time.time())
        self._metrics = IngressMetrics()

    def reconfigure(self, user_config: dict) -> None:
        """Serve's push of the served version (at start and on every reload): one assignment, atomic here."""
        self._version = ServedVersion.from_user_config(user_config)
        self._metrics.serving(self._version.ref_at().label)

    # -- helpers -----------------------------------------------------------------------------------------

    def _current(self) -> ModelRef:
        assert self._version is not None, "Serve calls reconfigure before any request"
        return self._version.ref_at()

    def _served_names(self, ref: ModelRef) -> set[str]:
        return {self._name, f"{self._name}/{ref.label.rsplit('/', 1)[-1]}", ref.label}

    @staticmethod
    def _token_hash(request: Request) -> str:
        """Hash of the bearer token; 401 when there is none."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401,
                "missing bearer token: send 'Authorization: Bearer <key>'",
                "invalid_request_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return hash_key(token.strip())

    def _check_auth(self, request: Request) -> None:
        if self._key_hash is None:
            return
        if not hmac.compare_digest(self._token_hash(request), self._key_hash):
            raise APIError(
                401,
                "incorrect API key",
                "invalid_request_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _check_admin(self, request: Request) -> None:
        """Admin endpoints: the admin key only (see `serving.config.AdminConfig`)."""
        if self._admin_key_hash is None:
            if not self._admin_open:
                raise APIError(
                    403,
                    f"admin endpoints are off: the server binds {self._cfg.host} and has no admin key "
                    f"(set ${self._cfg.admin.key_env} or admin.key_file)",
                    code="admin_disabled",
                )
            self._check_auth(request)
            return
        token = self._token_hash(request)
        if hmac.compare_digest(token, self._admin_key_hash):
            return
        if self._key_hash is not None and hmac.compare_digest(token, self._key_hash):
            raise APIError(
                403, "this API key may not use admin endpoints; send the admin key", code="forbidden"
            )
        raise APIError(
            401,
            "incorrect admin key",
            "invalid_request_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def _read_body(self, request: Request) -> bytes:
        limit = self._cfg.limits.max_request_bytes
        too_big = APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():  # chunked uploads without Content-Length are bounded too
            body.extend(chunk)
            if len(body) > limit:
                raise too_big
        return bytes(body)

    # -- routes ------------------------------------------------------------------------------------------

    @api.post(IMAGES_PATH)
    async def generations(self, request: Request) -> JSONResponse:
        started = time.monotonic()
        response = await self._generations(request)
        version = response.headers.get(MODEL_VERSION_HEADER, "")
        self._metrics.answered(response.status_code, time.monotonic() - started, version)
        return response

    async def _generations(self, request: Request) -> JSONResponse:
        try:
            self._check_auth(request)
            body = await self._read_body(request)
            ref = self._current()  # pinned at admission: a reload during this request does not mix versions
            job = parse_request(body, self._cfg.limits, self._served_names(ref), secrets.randbelow(2**31))
            if self._inflight >= self._cfg.queue.max_inflight:
                raise APIError(
                    503,
                    "server is at capacity, retry later",
                    "server_error",
                    code="overloaded",
                    headers={"Retry-After": str(self._cfg.queue.retry_after_s)},
                )
            self._inflight += 1
            self._metrics.inflight(self._inflight)
            try:
                result = await asyncio.wait_for(
                    self._generator.generate.remote(ref, job), self._cfg.limits.request_timeout_s
                )
            finally:
                self._inflight -= 1
                self._metrics.inflight(self._inflight)
            if "error" in result:
                raise APIError(
                    result["status"],
                    result["error"]["message"],
                    result["error"]["type"],
                    result["error"]["param"],
                    result["error"]["code"],
                    {"Retry-After": str(self._cfg.queue.retry_after_s)} if result["status"] == 503 else None,
                )
        except APIError as exc:
            return _json_error(exc)
        except BackPressureError:
            return _json_error(
                APIError(
                    503,
                    "server is at capacity, retry later",
                    "server_error",
                    code="overloaded",
                    headers={"Retry-After": str(self._cfg.queue.retry_after_s)},
                )
            )
        except TimeoutError:
            return _json_error(APIError(504, "generation timed out", "server_error", code="timeout"))
        except Exception:  # a replica died mid-request, etc.: still an OpenAI-shaped answer, details in logs
            logger.exception("generation request failed")
            return _json_error(APIError(500, "internal error while generating", "server_error"))
        self._metrics.images.inc(len(result["images"]), tags={"model_version": result["version"]})
        data = [
            {"b64_json": base64.b64encode(png).decode("ascii"), "seed": seed}
            for png, seed in zip(result["images"], result["seeds"], strict=True)
        ]
        return JSONResponse(
            {"created": int(time.time()), "model_version": result["version"], "data": data},
            headers={MODEL_VERSION_HEADER: result["version"]},
        )

    @api.get(MODELS_PATH)
    async def models(self, request: Request) -> JSONResponse:
        try:
            self._check_auth(request)
        except APIError as exc:
            return _json_error(exc)
        assert self._version is not None
        entry = {
            "id": self._name,
            "object": "model",
            "created": self._created,
            "owned_by": "lidit",
            "version": self._current().label,
            "model_uri": self._version.model_uri,
        }
        return JSONResponse({"object": "list", "data": [entry]})

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the ingress answers (no downstream calls, so it stays cheap under load)."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: both deployments hold the current version."""
        ref = self._current()
        try:
            ok = await asyncio.wait_for(
                asyncio.gather(self._encoder.ready.remote(ref), self._generator.ready.remote(ref)), 10
            )
        except Exception as exc:  # backpressure, timeout, replica restarting
            return JSONResponse(
                {"status": "not_ready", "version": ref.label, "reason": type(exc).__name__}, status_code=503
            )
        status = 200 if all(ok) else 503
        # Which ingress replica answered: lets an operator (and the scale test) see each replica's version.
        replica = serve.get_replica_context().replica_id.unique_id
        body = {"status": "ready" if all(ok) else "loading", "version": ref.label, "replica": replica}
        return JSONResponse(body, status_code=status)

    @api.post(RELOAD_PATH)
    async def reload(self, request: Request) -> JSONResponse:
        """Re-resolve the model URI (or switch to `{"model": URI}`), load it everywhere, then switch everywhere."""
        try:
            self._check_admin(request)
            body = await self._read_body(request)
            assert self._version is not None
            uri = self._version.model_uri
            if body.strip():
                try:
                    data = json.loads(body)
                except json.JSONDecodeError:
                    raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
                if not isinstance(data, dict) or not isinstance(data.get("model", uri), str):
                    raise APIError(400, 'body must be {"model": "models:/NAME@ALIAS"}', param="model")
                uri = data.get("model", uri)
                # Only other aliases/versions of the served registered model (rollback, canary promote);
                # pointing a server at an arbitrary path or model is a deployment change, not a reload.
                name = self._cfg.registered_name()
                if uri != self._version.model_uri and not (name and registered_name(uri) == name):
                    raise APIError(
                        400, f"reload can only switch to models:/{name}@ALIAS or /VERSION", param="model"
                    )
            async with self._reload_lock:
                old = self._current()
                try:
                    new = await asyncio.to_thread(
                        resolve_ref, uri, old.tracking_uri or tracking_uri_for(uri), old.models_dir
                    )
                except Exception as exc:
                    raise APIError(400, f"cannot resolve {uri!r}: {exc}", param="model") from None
                if new.key != old.key or uri != self._version.model_uri:
                    await self._switch(uri, old, new)
        except APIError as exc:
            return _json_error(exc)
        return JSONResponse({"previous": old.label, "current": new.label, "changed": new.key != old.key})

    async def _switch(self, uri: str, old: ModelRef, new: ModelRef) -> None:
        """Make every replica of the app serve `new`: load everywhere first, then switch at one instant."""
        app = serve.get_replica_context().app_name
        timeout = self._cfg.admin.reload_timeout_s
        try:
            if new.key != old.key:
                # A version that cannot load fails here, on one replica each, before any state changes.
                await asyncio.gather(self._encoder.load.remote(new), self._generator.load.remote(new))
                # Every encoder and generator replica (and any started later) holds both versions.
                held = model_user_config(new, old)
                await asyncio.to_thread(set_user_configs, app, {ENCODER: held, GENERATOR: held}, timeout)
            switch_at = time.time() + self._cfg.admin.switch_delay_s
            state = ServedVersion(uri, new, old, switch_at).to_user_config()
            await asyncio.to_thread(set_user_configs, app, {INGRESS: state}, timeout)
            late = time.time() - switch_at
            if late > 0:  # some ingress replica may have switched after its peers: say so, do not hide it
                logger.warning("ingress rollout finished %.1f s after the switch instant", late)
            else:
                await asyncio.sleep(-late)
            if new.key != old.key:  # replicas started from now on need only the new version
                current = model_user_config(new)
                await asyncio.to_thread(
                    set_user_configs, app, {ENCODER: current, GENERATOR: current}, timeout
                )
        except Exception as exc:  # DeployError, a replica that died mid-load, ...
            logger.exception("reload of %s failed", new.label)
            raise APIError(
                500, f"loading {new.label} failed, still serving {old.label}: {exc}", "server_error"
            ) from None
        logger.info("switched %s -> %s on every replica", old.label, new.label)
