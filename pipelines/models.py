"""What planning needs of the VAE and the encoders, read where the models are: on the workers.

The driver never opens a model directory (on a cluster the head does not mount them): `describe_models`
runs one small Ray task per model with the resources of the stage that will run it, so it lands on a node
that has the files. A task reads configs and the (memoised, `lidit.fingerprint`) weight hash; no weights
are loaded. The prefix states are computed by the encoder actors themselves (`pipelines.prefix`).
"""

from __future__ import annotations

import os

from lidit.cache import contract as C
from lidit.config import ConfigError, StrictModel
from lidit.encoder import EncoderConfig
from lidit.fingerprint import hash_json, hash_model_dir
from lidit.layout import TARGETS_VERSION
from pipelines.config import CacheBuildConfig, StageResources


class EncoderInfo(StrictModel):
    """An encoder as planned: everything of its manifest entry but the prefix (known once the actor ran)."""

    name: str
    config: dict
    fingerprint: str
    group_fingerprint: str
    hidden_size: int
    layout: bool
    negatives: bool
    dtype: C.StoredDType
    prefix_file: str


def describe_vae(path: str, latent_dtype: str, image: C.ImageSettings) -> C.VaeEntry:
    """The VAE's manifest entry from its config and weight hash."""
    from diffusers import AutoencoderKL

    if not os.path.isdir(path):
        raise ConfigError(f"vae: directory not found: {path}")
    vcfg = AutoencoderKL.load_config(path)
    fp = hash_model_dir(path)[:16]
    return C.VaeEntry(
        path=path,
        fingerprint=fp,
        group_fingerprint=hash_json([fp, latent_dtype, image.model_dump(mode="json")])[:16],
        latent_channels=int(vcfg["latent_channels"]),
        scale=2 ** (len(vcfg["block_out_channels"]) - 1),
        scaling_factor=float(vcfg.get("scaling_factor") or 1.0),
        shift_factor=float(vcfg.get("shift_factor") or 0.0),
        latents_mean=vcfg.get("latents_mean"),
        latents_std=vcfg.get("latents_std"),
        dtype=latent_dtype,
    )


def describe_encoder(
    ec: EncoderConfig, states_dtype: str, layout: bool = False, negatives: bool = False
) -> EncoderInfo:
    """An encoder's fingerprint (`PromptEncoder.fingerprint`) and width from its files; checks `layer`.
    `layout`: its column group also holds the layout targets (a build with grounded sources); `negatives`: the
    states of the rows' negative captions (a build with a negative-caption column)."""
    from transformers import AutoConfig

    from lidit.encoder import encoder_fingerprint

    if not os.path.isdir(ec.path):
        raise ConfigError(f"encoders.{ec.name}.path: directory not found: {ec.path}")
    text = AutoConfig.from_pretrained(ec.path).get_text_config()
    layers = int(text.num_hidden_layers)
    if not -(layers + 1) <= ec.layer <= layers:
        raise ConfigError(f"encoders.{ec.name}.layer: {ec.layer} out of range for {layers} blocks")
    fp = encoder_fingerprint(ec)
    return EncoderInfo(
        name=ec.name,
        config=ec.model_dump(mode="json"),
        fingerprint=fp,
        # Caches without layout or negatives keep their old group fingerprints (and shards).
        group_fingerprint=hash_json(
            [fp, states_dtype]
            + ([f"layout-{TARGETS_VERSION}"] if layout else [])
            + (["negatives-1"] if negatives else [])
        )[:16],
        hidden_size=int(text.hidden_size),
        layout=layout,
        negatives=negatives,
        dtype=states_dtype,
        prefix_file=f"{C.PREFIX_DIR}/{ec.name}-{fp}.safetensors",
    )


def describe_models(cfg: CacheBuildConfig, image: C.ImageSettings) -> tuple[C.VaeEntry, list[EncoderInfo]]:
    """Run the describe functions as Ray tasks where the VAE / encoder stages run; config errors come back
    as themselves (one line), anything else keeps its remote traceback."""
    import ray

    def options(res: StageResources) -> dict:
        return {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus or None, "max_retries": 0}

    vae = ray.remote(describe_vae).options(**options(cfg.vae_stage)).remote(cfg.vae, cfg.latent_dtype, image)
    enc = ray.remote(describe_encoder).options(**options(cfg.encoder_stage))
    encoders = [enc.remote(ec, cfg.states_dtype, cfg.layout, cfg.negatives) for ec in cfg.encoders]
    try:
        return ray.get(vae), ray.get(encoders)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ConfigError):
            raise exc.cause from None
        raise
