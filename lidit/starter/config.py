"""Config of the starter build, with presets (`default`: the full offline set; `micro`: seconds, for tests)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from lidit.config import (
    ConfigError,
    StrictModel,
    deep_merge,
    dump_config,
    format_validation_error,
    parse_overrides,
)
from lidit.fingerprint import hash_json

# The instruction of the LI-DiT paper (DESIGN 1.1), defined once in lidit.instruction. Some LM training samples
# are prefixed with it so the tiny LMs have seen the text the prompt encoder puts in front of every prompt.
from lidit.instruction import DEFAULT_INSTRUCTION
from lidit.starter.scenes import DEFAULT_KIND_WEIGHTS


class DataConfig(StrictModel):
    """The synthetic image-caption set."""

    image_size: int = Field(64, ge=32, le=512, description="square image side in pixels")
    # 24000, not 3000: the `long` recipe (20000 steps x 32) saw each of 3000 images ~213 times and learnt them
    # (training-prompt overall 0.63, held-out 0.32). On 24000 images (learning_curve.md, `long` vs `long-3k`)
    # held-out shape 0.59 -> 0.90, binding 0.51 -> 0.89, overall 0.32 -> 0.39 at the same 20000 steps.
    n_train: int = Field(24000, ge=1)
    n_heldout: int = Field(500, ge=1)
    heldout_fraction: float = Field(
        0.1, gt=0, le=0.14, description="share of (colour, shape, context) keys held out"
    )
    shard_rows: int = Field(1000, ge=1, description="rows per Parquet shard")
    grid: int = Field(0, ge=0, description="object corners on multiples of this many pixels (0: anywhere)")
    kind_weights: dict[Literal["single", "count", "pair", "relation"], float] = Field(
        default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS),
        description="training-scene mix by kind (held-out scenes are count and relation scenes)",
    )

    @field_validator("kind_weights")
    @classmethod
    def _positive_mix(cls, weights: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"kind weights must be >= 0 with a positive sum, got {weights}")
        return weights


class TokenizerConfig(StrictModel):
    """Byte-level BPE trained on the captions (any text still encodes: no unknown tokens)."""

    vocab_size: int = Field(512, ge=300)
    min_frequency: int = Field(2, ge=1)


class LMArchConfig(StrictModel):
    """One tiny causal LM."""

    family: Literal["llama", "qwen2"]
    hidden_size: int = Field(ge=8)
    intermediate_size: int = Field(ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)


class LMConfig(StrictModel):
    """Both LMs and their (shared) next-token training recipe."""

    llama: LMArchConfig = LMArchConfig(family="llama", hidden_size=64, intermediate_size=192)
    qwen2: LMArchConfig = LMArchConfig(family="qwen2", hidden_size=96, intermediate_size=256)
    # Next-token loss on the grammar flattens by ~100 steps (measured: 0.81 at step 100, 0.80 at 200 and 400).
    steps: int = Field(150, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(15, ge=0)
    max_length: int = Field(64, ge=8, description="tokens per training sample (instruction + caption)")
    instruction: str = DEFAULT_INSTRUCTION
    instruction_prob: float = Field(
        0.3, ge=0, le=1, description="share of samples prefixed with the instruction"
    )
    eval_captions: int = Field(500, ge=1, description="held-out captions for perplexity")


class VAEConfig(StrictModel):
    """The tiny AutoencoderKL (3 levels: 64x64 -> latent_channels x 16 x 16)."""

    block_out_channels: list[int] = [16, 16, 32]
    norm_num_groups: int = Field(8, ge=1)
    layers_per_block: int = Field(1, ge=1)
    mid_block_attention: bool = False
    latent_channels: int = Field(4, ge=1)
    steps: int = Field(600, ge=1)
    batch_size: int = Field(16, ge=1)
    # Early steps train on crops (the VAE is fully convolutional): a 32x32 crop costs a quarter of a full image,
    # so the same CPU time sees more shapes. Measured at equal CPU: 31.3 dB with crops vs 29.1 dB without.
    crop_size: int = Field(32, ge=0, description="crop side for the first crop_fraction of steps (0: off)")
    crop_fraction: float = Field(0.67, ge=0, le=1)
    crop_batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    kl_weight: float = Field(1e-6, ge=0)
    eval_images: int = Field(200, ge=1, description="held-out images for PSNR and the latent scale")


class StarterConfig(StrictModel):
    """Everything `build_starter` needs; its dump is part of every stage fingerprint."""

    seed: int = 0
    # One thread per job and two jobs at once (LMs in a worker process beside the VAE): tiny models gain little
    # from intra-op threads, and on a busy machine two-thread ops stall on each other (seen 4-10x slower).
    threads: int | None = Field(1, ge=1, description="torch threads per build process (None: all cores)")
    parallel: bool = Field(True, description="train the LMs in a worker process while the VAE trains")
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    lm: LMConfig = LMConfig()
    vae: VAEConfig = VAEConfig()


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # For tests and smoke runs: same formats, seconds of training (quality numbers are not meaningful).
    "micro": {
        "parallel": False,  # a worker process would re-import torch and transformers: more than the work here
        "data": {"n_train": 240, "n_heldout": 60, "shard_rows": 100},
        "tokenizer": {"vocab_size": 320},
        "lm": {
            "steps": 25,
            "batch_size": 32,
            "warmup_steps": 5,
            "eval_captions": 60,
            "llama": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2},
            "qwen2": {"hidden_size": 48, "intermediate_size": 96, "num_layers": 2},
        },
        "vae": {
            "block_out_channels": [8, 8, 16],
            "norm_num_groups": 4,
            "steps": 15,
            "batch_size": 8,
            "warmup_steps": 3,
            "eval_images": 32,
        },
    },
}


def starter_config(
    preset: str = "default", overrides: dict[str, Any] | list[str] | None = None
) -> StarterConfig:
    """A preset plus overrides (a nested dict, or `key=value` strings as on the command line)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown starter preset {preset!r} (choose from {', '.join(PRESETS)})")
    data = StarterConfig().model_dump()
    data = deep_merge(data, PRESETS[preset])
    if overrides:
        update = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = deep_merge(data, update)
    try:
        return StarterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(StarterConfig, exc)) from exc


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able object (or a config)."""
    if isinstance(obj, StrictModel):
        obj = dump_config(obj)
    return hash_json(obj)[:16]
