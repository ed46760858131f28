"""`TrainConfig`: everything a training run needs, validated, loadable from YAML with `--set` overrides."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lidit.config import StrictModel, lidit_home
from lidit.locations import models_root
from lidit.objectives import ObjectiveName, TimestepSampling
from lidit.presets import PRESETS


class ModelSection(StrictModel):
    """Generator architecture: a preset plus the LI-DiT ablation switches."""

    preset: str = "tiny"
    # Flow by measurement: on the starter set it follows colour and layout far earlier than epsilon (the
    # paper's), whose x0 signal at high noise is tiny (alpha_bar at t=999 is 4e-5 with linear betas).
    objective: ObjectiveName = "flow"
    flow_shift: float = Field(3.0, gt=0, description="flow: noise-level shift for training and sampling")
    timestep_sampling: TimestepSampling = "uniform"
    contrastive_weight: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="contrastive flow matching (Stoica et al. 2025): also push each text-conditioned prediction "
        "away from another row's target by this weight (0 = plain MSE; the paper uses 0.05)",
    )
    hard_negative_weight: float = Field(
        0.0,
        ge=0,
        description="hard negatives: also train the prediction of each row that has a negative caption (the "
        "cache's `negative_caption`, from a source's negative_caption_column) to miss the image under it by "
        "`hard_negative_margin` more than under the true caption (0 = off)",
    )
    hard_negative_margin: float = Field(
        0.1,
        ge=0,
        description="relative margin: negative-caption MSE must exceed (1 + margin) x true-caption MSE",
    )
    hard_negative_min_sigma: float = Field(
        0.7,
        ge=0,
        le=1,
        description="noise level from which the hard-negative term applies: below it the noisy input shows the "
        "layout, so the best prediction under either caption is nearly the same",
    )
    hard_negative_max_sigma: float = Field(
        1.0,
        ge=0,
        le=1,
        description="noise level up to which the hard-negative term applies: near pure noise nothing is placed "
        "yet, so no prediction can tell two shapes apart",
    )
    layout_weight: float = Field(
        0.0,
        ge=0,
        description="text-side layout supervision: a head on the fused prompt tokens also learns where each object "
        "named in a relation caption stands, weighted by this (0 = off; needs the cache's per-token layout "
        "targets, from a source's grounding_column)",
    )
    foreground_weight: float = Field(
        0.0,
        ge=0,
        description="count the loss on each image's objects (positions away from its background, dilated by one "
        "latent pixel) 1 + this times as much as on the background (0 = plain MSE); the mean weight stays 1",
    )
    encoders: list[str] | None = Field(None, description="subset of the cache's encoders (default: all)")
    fusion: Literal["collaborative", "concat"] = "collaborative"
    refiner_depth: int | None = Field(None, ge=0, description="override the preset; 0 = raw LLM states")
    refiner_causal: bool = False
    overrides: dict[str, Any] = Field(default_factory=dict, description="other GeneratorConfig fields")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        # Checked when the config loads (before Ray starts), not first inside a worker.
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _hard_negative_settings(self) -> ModelSection:
        # An empty band would silently train without the term the weight asks for.
        if self.hard_negative_min_sigma > self.hard_negative_max_sigma:
            raise ValueError(
                f"hard_negative_min_sigma {self.hard_negative_min_sigma} is above hard_negative_max_sigma "
                f"{self.hard_negative_max_sigma}: the hard-negative term would never apply"
            )
        return self


class OptimSection(StrictModel):
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    text_lr_scale: float = Field(
        1.0,
        gt=0,
        description="learning rate of the text path (refiners, collaborative refiner, null token, text pool, "
        "cross-attention) relative to lr; 1 = one rate for every parameter (training.step.TEXT_PATH)",
    )
    implementation: Literal["auto", "foreach", "fused"] = Field(
        "auto",
        description="AdamW kernels: fused = one kernel over all parameters per step; foreach = multi-tensor "
        "ops; auto = fused (training.step.build_optimizer)",
    )


class ScaleSection(StrictModel):
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU"
    )
    activation_checkpointing: bool = False
    compile: bool = False
    compile_text_multiple: int = Field(
        1,
        ge=1,
        description="with compile: pad each batch's text tokens (masked out) to a multiple of this. A compiled "
        "block recompiles for every new text length, up to torch's limit of 8, then runs it eager: set e.g. 16 "
        "when the captions have more lengths than that. 1 = no padding (the starter's 7 lengths compile "
        "fastest unpadded: benchmarks/results/compile_step_long.md)",
    )
    reshard_after_forward: bool = Field(
        True,
        description="FSDP2: free each block's gathered weights after its forward and gather them again for "
        "backward (less memory); false keeps them until backward (one all-gather per block and step, not two)",
    )
    strategy: Literal["auto", "fsdp", "replicate"] = Field(
        "auto",
        description="data parallelism: fsdp = FSDP2 sharding; replicate = DDP-style full replicas with one "
        "gradient all-reduce; auto = fsdp on GPU, replicate for small models on CPU (see "
        "training.parallelize.resolve_strategy)",
    )

    @model_validator(mode="after")
    def _check(self) -> ScaleSection:
        if self.strategy == "replicate" and self.mixed_precision == "bf16":
            # bf16 compute comes from FSDP2's MixedPrecisionPolicy; replicas have no such policy here.
            raise ValueError("mixed_precision bf16 needs strategy fsdp (or auto on GPU)")
        return self


class CheckpointSection(StrictModel):
    every: int = Field(100, ge=1)
    keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)


class TrackingSection(StrictModel):
    experiment: str = "lidit-train"
    registered_model: str | None = "lidit-starter"
    alias: str | None = "production"
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(
        0,
        ge=0,
        description="sample grid every N steps with 1 worker (0 = only at the end); with 2+ workers grids are "
        "drawn only after the last step, so they never stall the other ranks (training.loop.intermediate_sampling)",
    )
    system_metrics_every_s: float = Field(
        10.0,
        ge=0,
        description="CPU/memory/GPU every N s (0 = off): rank 0's node as system/* run metrics, every other "
        "node (its first worker) as system/node_<N>/*",
    )
    num_samples: int = Field(8, ge=0)
    sample_steps: int = Field(20, ge=1)
    guidance_scale: float = 4.0
    eval_starter: str | None = Field(
        None,
        description="starter directory whose held-out prompts (combinations never seen in training) score the "
        "exported pipeline after the last step: heldout.* metrics on the run and tags on the registered "
        "version (None = no evaluation)",
    )
    eval_prompts: int = Field(100, ge=1, description="held-out prompts scored (the first N)")
    eval_batch_size: int = Field(50, ge=1, description="prompts generated per batch while scoring")


class TrainConfig(StrictModel):
    """A training run. Same `storage_path` + `name` resumes the run from its latest checkpoint."""

    cache: str = Field(default_factory=lambda: str(lidit_home() / "cache"), description="cache URI")
    cache_version: int | None = None
    name: str = Field("lidit-starter", pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: str = Field(default_factory=lambda: str(lidit_home() / "runs"))
    models_root: str = Field(
        default_factory=lambda: str(models_root()),
        description="encoders and VAE under this directory are exported as portable lidit-models:// "
        "locations (default $LIDIT_MODELS_ROOT, else LIDIT_HOME; see lidit.locations)",
    )
    steps: int = Field(500, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch size, split evenly over workers")
    cfg_drop_prob: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    model: ModelSection = ModelSection()
    optim: OptimSection = OptimSection()
    scale: ScaleSection = ScaleSection()
    checkpoint: CheckpointSection = CheckpointSection()
    tracking: TrackingSection = TrackingSection()
    stop_after: int | None = Field(
        None,
        ge=1,
        description="end this invocation at this step with a checkpoint (the schedule still spans "
        "`steps`); run again to continue. For time-boxed or preemptible jobs.",
    )
    fail_at_step: int | None = Field(None, description="test hook: one worker dies once at this step")

    @field_validator("storage_path")
    @classmethod
    def _absolute_storage(cls, value: str) -> str:
        # Ray Train (pyarrow's FileSystem.from_uri) takes an absolute path or a URI; a relative path is the
        # driver's working directory, as a user means it.
        return value if "://" in value else os.path.abspath(os.path.expanduser(value))

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size % self.scale.workers:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by workers {self.scale.workers}"
            )
        return self
