"""`ServeConfig`: everything `lidit serve` and the Serve application builder need, loaded from YAML.

One schema for the CLI, `python -m serving`, `serve run serving.app:app_builder` and the tests, so a limit
or a resource setting is defined once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lidit.config import StrictModel
from lidit.registry import parse_model_uri, registered_name

SIZE_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"


class LimitsConfig(StrictModel):
    """Request validation limits (violations are 4xx, never a server error)."""

    max_prompt_chars: int = Field(1000, gt=0)
    max_n: int = Field(4, ge=1, description="images per request")
    min_steps: int = Field(1, ge=1)
    max_steps: int = Field(50, ge=1)
    default_steps: int = Field(20, ge=1)
    max_guidance: float = Field(30.0, ge=1.0)
    default_guidance: float = Field(4.0, ge=0.0)
    sizes: list[str] | None = Field(
        None, description="allowed 'WxH' sizes; None = any size up to max_side that the model supports"
    )
    max_side: int = Field(256, gt=0)
    default_size: str = Field("64x64", pattern=SIZE_PATTERN)
    max_request_bytes: int = Field(64 * 1024, gt=0, description="larger bodies get 413")
    request_timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> LimitsConfig:
        if not self.min_steps <= self.default_steps <= self.max_steps:
            raise ValueError("need min_steps <= default_steps <= max_steps")
        if not self.default_guidance <= self.max_guidance:
            raise ValueError("default_guidance must not exceed max_guidance")
        return self


class BatchingConfig(StrictModel):
    """`@serve.batch` parameters; `enabled: false` forces batches of one (the benchmark's baseline)."""

    enabled: bool = True
    encoder_max_batch_size: int = Field(32, ge=1, description="requests per text-encoder batch")
    generator_max_batch_size: int = Field(16, ge=1, description="requests per generator batch")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0.0,
        description="how long a batch waits for more requests; 0 = take what is queued: batches still form "
        "under load (requests queue while a batch runs) and a lone request waits for nothing "
        "(benchmarks/results/serve_load_64px.md: 0.01 cost 1.28x the unbatched p50 at concurrency 1)",
    )


class QueueConfig(StrictModel):
    """Backpressure: bounded work in the app; anything beyond gets 503 + Retry-After."""

    max_inflight: int = Field(64, ge=1, description="generation requests admitted at once by the ingress")
    max_queued_requests: int = Field(
        128, ge=1, description="Serve's own queue bound per deployment (second line of defence)"
    )
    retry_after_s: int = Field(1, ge=0)


class ResourcesConfig(StrictModel):
    """Torch threads and device of the model replicas (per-deployment CPUs/GPUs: `deployments`)."""

    torch_threads: int | None = Field(None, ge=1, description="None = Ray's default for the replica")
    device: str = "cpu"


class AutoscalingConfig(StrictModel):
    """Serve autoscaling of one deployment: replicas between min and max, sized to the ongoing requests."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0, description="per replica; batching wants it high")

    @model_validator(mode="after")
    def _check(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("need min_replicas <= max_replicas")
        return self


class DeploymentScaleConfig(StrictModel):
    """Replicas and resources of one deployment: a fixed `num_replicas` or `autoscaling`, not both."""

    num_replicas: int | None = Field(None, ge=1, description="fixed replica count (default 1)")
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(0.5, gt=0, description="logical CPUs per replica (fractional fits a 2-core box)")
    num_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> DeploymentScaleConfig:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set num_replicas or autoscaling, not both")
        return self

    def serve_options(self) -> dict:
        """The `Deployment.options(...)` keywords for replicas and resources."""
        opts: dict = {"ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts


class DeploymentsConfig(StrictModel):
    """The three deployments scale apart: `--set deployments.generator.num_replicas=2`."""

    ingress: DeploymentScaleConfig = Field(default_factory=lambda: DeploymentScaleConfig(num_cpus=0.1))
    encoder: DeploymentScaleConfig = Field(default_factory=lambda: DeploymentScaleConfig(num_cpus=0.5))
    generator: DeploymentScaleConfig = Field(default_factory=lambda: DeploymentScaleConfig(num_cpus=1.0))


def read_key(env: str, file: str | None, what: str) -> str | None:
    """A secret from `file` (first) or the environment variable `env`; None when neither has one."""
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"{what} file {path} is empty")
        return key
    return os.environ.get(env, "").strip() or None


class AuthConfig(StrictModel):
    """Bearer-token auth: on when a key is found in `api_key_env` or `api_key_file` (or `required`)."""

    api_key_env: str = "LIDIT_API_KEY"
    api_key_file: str | None = None
    required: bool = Field(False, description="refuse to start without a key")

    def resolve_key(self) -> str | None:
        """The configured key, from the file first, then the environment; None = auth off."""
        key = read_key(self.api_key_env, self.api_key_file, "api key")
        if key is None and self.required:
            raise ValueError(f"auth.required is set but no key in ${self.api_key_env} or auth.api_key_file")
        return key


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: may resolve to anything
        return False


class AdminConfig(StrictModel):
    """The admin endpoints (`/admin/reload`): their own credential, and how a reload rolls out.

    With an admin key (from `key_env` or `key_file`), admin endpoints take only that key: the image clients'
    key gets 403. Without one they are off (403), unless the server binds loopback only, where whoever can
    reach it is on this machine (then the client key, if set, guards them as it guards images).
    """

    key_env: str = "LIDIT_ADMIN_KEY"
    key_file: str | None = None

    switch_delay_s: float = Field(
        2.0,
        ge=0.0,
        description="every ingress replica switches this long after the reload pushed the new state "
        "(longer than Serve's rollout of a user_config to all ingress replicas, so they switch together)",
    )
    reload_timeout_s: float = Field(600.0, gt=0, description="loading a version on every replica")

    def resolve_key(self) -> str | None:
        """The admin key, from the file first, then the environment; None = no admin credential."""
        return read_key(self.key_env, self.key_file, "admin key")


class StartupConfig(StrictModel):
    """How long `lidit serve` waits for Serve: a loaded box needs minutes, not Serve's defaults of seconds."""

    timeout_s: float = Field(900.0, gt=0, description="until every replica of the app is up")
    proxy_ready_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Serve's HTTP proxy readiness check, 3 tries (Serve's 5 s fails while other work holds "
        "the cores); applies to a Ray that `lidit serve` starts",
    )


class LogsConfig(StrictModel):
    """Where Serve's logs go. `file`: the Ray session's `logs/serve/` only (access lines included);
    `console`: also stderr; `disabled`: no access lines at all (other logs to file)."""

    access_log: Literal["file", "console", "disabled"] = "file"


class ServeConfig(StrictModel):
    """The serving application: which model, where to listen, limits, batching, queues, resources, auth."""

    model: str = Field(
        "models:/lidit-starter@production",
        min_length=1,
        description="models:/NAME@ALIAS, models:/NAME/VERSION or a local pipeline export directory",
    )
    served_model_name: str | None = Field(None, description="name clients pass as `model`; default NAME")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "lidit"
    route_prefix: str = "/"
    models_dir: str | None = Field(None, description="download dir for registry versions; default LIDIT_HOME")
    models_root: str | None = Field(
        None,
        description="where the lidit-models:// locations of encoders and VAE in pipeline.json resolve "
        "(lidit.locations); default $LIDIT_MODELS_ROOT, else LIDIT_HOME",
    )
    keep_models: int = Field(2, ge=1, description="versions kept loaded per replica (old one for in-flight)")
    lru_size: int = Field(1024, ge=0, description="prompt states kept by the text encoder (0 = off)")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    deployments: DeploymentsConfig = Field(default_factory=DeploymentsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    startup: StartupConfig = Field(default_factory=StartupConfig)
    logs: LogsConfig = Field(default_factory=LogsConfig)

    @field_validator("models_root")
    @classmethod
    def _absolute_root(cls, value: str | None) -> str | None:
        # Made absolute where the config is loaded: replicas run with another working directory.
        return str(Path(value).expanduser().resolve()) if value else None

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        parse_model_uri(self.model)  # a malformed models:/ URI is a config error here, not at deploy
        return self

    def registered_name(self) -> str | None:
        """NAME of a `models:/NAME@ALIAS` / `models:/NAME/VERSION` model; None for a local export."""
        return registered_name(self.model)

    def default_model_name(self) -> str:
        """Name clients use: `served_model_name`, else the registered name, else the export dir's name."""
        if self.served_model_name:
            return self.served_model_name
        return self.registered_name() or Path(self.model).resolve().name


def hash_key(key: str) -> str:
    """What the ingress stores instead of the key itself (the deployment's init args are not secret)."""
    return hashlib.sha256(key.encode()).hexdigest()
