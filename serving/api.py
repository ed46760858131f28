"""Wire format: an OpenAI Images API subset plus our sampling extensions, and OpenAI-shaped errors.

`POST /v1/images/generations` takes `model`, `prompt`, `n`, `size` ("WxH"), `response_format` ("b64_json")
and the extensions `negative_prompt`, `num_inference_steps`, `guidance_scale`, `seed`; it answers
`{"created": ..., "model_version": ..., "data": [{"b64_json": ..., "seed": ...}]}` with PNG images. Errors are
`{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status. Nothing here imports Ray, so the
client (`lidit generate`) and unit tests use it without a cluster.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from serving.config import LimitsConfig

IMAGES_PATH = "/v1/images/generations"
MODELS_PATH = "/v1/models"
RELOAD_PATH = "/admin/reload"
MAX_SEED = 2**63 - 1
MODEL_VERSION_HEADER = (
    "x-lidit-model-version"  # which registry version produced the images (also in the body)
)


class APIError(Exception):
    """An error answered to the client in OpenAI shape (never a stack trace)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ImageGenerationRequest(BaseModel):
    """Body of `POST /v1/images/generations`. Strict types: "2" is not an int, 1 is not a string."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: StrictStr
    model: StrictStr | None = None
    n: StrictInt = 1
    size: StrictStr | None = None
    response_format: Literal["b64_json"] = "b64_json"
    negative_prompt: StrictStr | None = None
    num_inference_steps: StrictInt | None = None
    guidance_scale: StrictFloat | StrictInt | None = None
    seed: StrictInt | None = None
    user: StrictStr | None = Field(None, description="accepted for OpenAI compatibility, unused")


class ImageData(BaseModel):
    b64_json: str
    seed: int


class ImageGenerationResponse(BaseModel):
    created: int
    model_version: str
    data: list[ImageData]


class GenerationJob(BaseModel):
    """A validated request, with defaults filled in: what the ingress hands to the Generator."""

    prompt: str
    negative_prompt: str | None
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    seed: int


def parse_size(size: str, limits: LimitsConfig) -> tuple[int, int]:
    """'WxH' -> (width, height) within the configured limits; raises APIError(400, param='size')."""
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 5 for p in parts):
        raise APIError(400, f"size must look like 'WIDTHxHEIGHT' (e.g. '64x64'), got {size!r}", param="size")
    w, h = int(parts[0]), int(parts[1])
    if limits.sizes is not None and f"{w}x{h}" not in limits.sizes:
        raise APIError(400, f"size {w}x{h} is not served; allowed: {', '.join(limits.sizes)}", param="size")
    if not (0 < w <= limits.max_side and 0 < h <= limits.max_side):
        raise APIError(400, f"size {w}x{h}: each side must be in 1..{limits.max_side}", param="size")
    return w, h


def _pydantic_error(exc: ValidationError) -> APIError:
    err = exc.errors()[0]
    param = str(err["loc"][0]) if err["loc"] else None  # union members add a second level: drop it
    if err["type"] == "extra_forbidden":
        return APIError(400, f"unknown parameter {param!r}", param=param, code="unknown_parameter")
    if err["type"] == "missing":
        return APIError(400, f"missing required parameter {param!r}", param=param, code="missing_parameter")
    return APIError(400, f"invalid {param!r}: {err['msg']}", param=param, code="invalid_type")


def parse_request(body: bytes, limits: LimitsConfig, served_names: set[str], seed: int) -> GenerationJob:
    """Decode, type-check and range-check a request body; `seed` is used when the client gives none."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        req = ImageGenerationRequest.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_error(exc) from None
    if req.model is not None and req.model not in served_names:
        raise APIError(
            404,
            f"model {req.model!r} does not exist; this server serves {sorted(served_names)}",
            param="model",
            code="model_not_found",
        )
    prompt = req.prompt.strip()
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
    if len(req.prompt) > limits.max_prompt_chars:
        raise APIError(
            400,
            f"prompt has {len(req.prompt)} characters, more than {limits.max_prompt_chars}",
            param="prompt",
            code="prompt_too_long",
        )
    neg = req.negative_prompt.strip() if req.negative_prompt else None
    if req.negative_prompt is not None and len(req.negative_prompt) > limits.max_prompt_chars:
        raise APIError(
            400,
            f"negative_prompt is longer than {limits.max_prompt_chars} characters",
            param="negative_prompt",
            code="prompt_too_long",
        )
    if not 1 <= req.n <= limits.max_n:
        raise APIError(400, f"n must be in 1..{limits.max_n}, got {req.n}", param="n")
    steps = limits.default_steps if req.num_inference_steps is None else req.num_inference_steps
    if not limits.min_steps <= steps <= limits.max_steps:
        raise APIError(
            400,
            f"num_inference_steps must be in {limits.min_steps}..{limits.max_steps}, got {steps}",
            param="num_inference_steps",
        )
    guidance = limits.default_guidance if req.guidance_scale is None else float(req.guidance_scale)
    if not math.isfinite(guidance) or not 0.0 <= guidance <= limits.max_guidance:
        raise APIError(
            400,
            f"guidance_scale must be a finite number in 0..{limits.max_guidance}, got {guidance}",
            param="guidance_scale",
        )
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED - limits.max_n:
        raise APIError(400, f"seed must be in 0..{MAX_SEED - limits.max_n}", param="seed")
    w, h = parse_size(req.size or limits.default_size, limits)
    return GenerationJob(
        prompt=prompt,
        negative_prompt=neg or None,
        n=req.n,
        width=w,
        height=h,
        steps=steps,
        guidance=guidance,
        seed=req.seed if req.seed is not None else seed,
    )


def deployment_error(
    status: int, message: str, type_: str = "server_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An error travelling back from a deployment as data (exceptions across Ray lose their type)."""
    return {**error_body(message, type_, param, code), "status": status}
