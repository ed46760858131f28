"""`CacheBuildConfig`: what `lidit cache build` / `python -m pipelines.build` read from YAML.

String values may use `${VAR}`, expanded by `lidit.config.expand_vars` (the one policy: braced form only, after
overrides, unset variables are an error, `${LIDIT_HOME}` always defined).
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, ValidationError, model_validator

from lidit.cache.contract import StoredDType
from lidit.config import (
    ConfigError,
    StrictModel,
    deep_merge,
    expand_vars,
    format_validation_error,
    parse_overrides,
    read_yaml_mapping,
)
from lidit.encoder import EncoderConfig
from pipelines.sources import SourceConfig


class StageResources(StrictModel):
    """Ray resources of one pipeline stage (per task or per actor)."""

    size: int = Field(1, ge=1, description="actor pool size; for decode: at most this many tasks at once")
    num_cpus: float = Field(0.5, gt=0, description="fractional CPUs: whole CPUs per actor can starve reads")
    num_gpus: float = Field(0.0, ge=0, description="> 0 runs the model on CUDA")
    batch_size: int = Field(32, ge=1)
    threads: int | None = Field(None, ge=1, description="torch threads in the worker (None: Ray's default)")


class RayConfig(StrictModel):
    """Which Ray to use; the sizes apply only when the build starts a local one."""

    address: str | None = Field(
        None,
        description="None: $RAY_ADDRESS or a running local cluster, else start one; 'local': always start one",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="logical CPUs (None: cluster.local_ray_options' rule, max(4, cores))"
    )
    object_store_mb: int = Field(100, ge=75, description="object store of a local Ray this build starts")


class CacheBuildConfig(StrictModel):
    """A feature cache build: sources -> (VAE latents, LLM states per encoder) -> cache at `output`."""

    sources: list[SourceConfig] = Field(min_length=1)
    output: str = Field(min_length=1, description="cache root: local path or s3://bucket/prefix")
    encoders: list[EncoderConfig] = Field(min_length=1)
    vae: str = Field(min_length=1, description="diffusers AutoencoderKL directory")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="s3fs options (endpoint_url, key, secret); env is the default"
    )
    # images
    resolution: int = Field(64, ge=8, description="bucket area is about resolution**2 pixels")
    bucket_multiple: int = Field(16, ge=1, description="bucket sides are multiples of this")
    max_aspect: float = Field(2.0, ge=1.0)
    buckets: list[tuple[int, int]] | None = Field(None, description="explicit (width, height) buckets")
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="larger images are quarantined (bombs)")
    min_image_side: int = Field(8, ge=1)
    # storage
    latent_dtype: StoredDType = "float16"
    states_dtype: StoredDType = "float16"
    rows_per_shard: int = Field(1024, ge=1)
    # stages
    decode: StageResources = Field(default_factory=lambda: StageResources(size=2, num_cpus=0.25))
    vae_stage: StageResources = Field(default_factory=StageResources)
    encoder_stage: StageResources = Field(default_factory=lambda: StageResources(batch_size=64))
    ray: RayConfig = Field(default_factory=RayConfig)
    # reporting
    mlflow: bool = True
    mlflow_experiment: str = "lidit-cache"
    progress: bool = True
    fail_after_shards: int | None = Field(
        None, ge=0, description="testing hook: raise after writing this many shards (kill-and-resume tests)"
    )

    @model_validator(mode="after")
    def _check(self) -> CacheBuildConfig:
        names = [e.name for e in self.encoders]
        if len(set(names)) != len(names):
            raise ValueError(f"encoder names must be unique, got {names}")
        for w, h in self.buckets or []:
            if w % self.bucket_multiple or h % self.bucket_multiple:
                raise ValueError(
                    f"bucket {w}x{h} is not a multiple of bucket_multiple={self.bucket_multiple}"
                )
        return self

    @property
    def layout(self) -> bool:
        """Whether the cache stores per-token layout targets: some source has grounded captions."""
        return any(s.grounding_column for s in self.sources)

    @property
    def negatives(self) -> bool:
        """Whether the cache stores negative captions' states: some source has a negative-caption column."""
        return any(s.negative_caption_column for s in self.sources)

    def bucket_list(self) -> list[tuple[int, int]]:
        """Explicit buckets, or (w, h) with area ~ resolution**2, sides multiples of bucket_multiple."""
        if self.buckets:
            return sorted({(int(w), int(h)) for w, h in self.buckets})
        m, area = self.bucket_multiple, self.resolution**2
        out = set()
        w = m
        while w <= self.resolution * self.max_aspect:
            h = max(m, int(round(area / w / m)) * m)
            if max(w / h, h / w) <= self.max_aspect:
                out.add((w, h))
            w += m
        if not out:
            out.add((max(m, self.resolution // m * m),) * 2)
        return sorted(out)


def load_build_config(
    path: str | os.PathLike | None,
    overrides: list[str] | None = None,
    sources: list[str] | None = None,
    output: str | None = None,
) -> CacheBuildConfig:
    """YAML file + `--set` overrides + `--source`/`--output` flags -> a validated config."""
    # Expansion happens below, strictly and after the overrides are merged in.
    data: dict[str, Any] = read_yaml_mapping(path, expand=False) if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides))
    if sources:
        data["sources"] = [{"uri": s} for s in sources]
    if output:
        data["output"] = output
    data = expand_vars(data)
    try:
        return CacheBuildConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(CacheBuildConfig, exc, path)) from exc
