"""Inference: prompts -> images. The pipeline owns the sampling loop (generator -> scheduler.step -> VAE
decode); the generator knows no scheduler. Serving and the CLI call this object.

A pipeline directory (what training exports and the registry stores):

    pipeline.json        objective, sampler, encoder configs + fingerprints, VAE location + fingerprint
    generator/           config.json + model.safetensors of the refiners + LI-DiT

LLMs and the VAE are referenced by location, not copied (they are large and shared): `lidit-models://REL`
under the models root each machine configures (`lidit.locations`), or an absolute path for models that were
outside the root at export. Their fingerprints are checked when the pipeline loads, so a moved or changed
encoder cannot silently serve wrong features.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from pydantic import Field

from lidit.config import StrictModel
from lidit.encoder import EncoderConfig, PromptEncoder
from lidit.fingerprint import hash_model_dir
from lidit.generator import LiDiTGenerator, TextFeatures
from lidit.locations import is_portable, portable_location, resolve_location
from lidit.locations import models_root as resolve_root
from lidit.objectives import DEFAULT_SAMPLER, ObjectiveName, make_scheduler

PIPELINE_CONFIG = "pipeline.json"
GENERATOR_DIR = "generator"


class FingerprintMismatchError(ValueError):
    """An encoder or the VAE found at a pipeline's location is not the one it was trained on (one line)."""


class PipelineSpec(StrictModel):
    """Contents of pipeline.json. Encoder `path`s and `vae` are locations (see `lidit.locations`):
    `lidit-models://REL` in a portable export, absolute paths in older ones or for models outside the root."""

    objective: ObjectiveName = "epsilon"
    sampler: str | None = None
    flow_shift: float = Field(1.0, gt=0, description="sampler shift of a flow model (its training shift)")
    encoders: list[EncoderConfig] = Field(min_length=1)
    encoder_fingerprints: dict[str, str] = Field(default_factory=dict)
    vae: str
    vae_fingerprint: str | None = None
    default_size: int = 64
    extra: dict[str, str] = Field(
        default_factory=dict, description="lineage: cache manifest, git commit, ..."
    )

    def portable(self, root: str | Path) -> tuple[PipelineSpec, list[str]]:
        """This spec with every model under `root` named `lidit-models://REL`, plus what stayed absolute."""
        encoders = [e.model_copy(update={"path": portable_location(e.path, root)}) for e in self.encoders]
        spec = self.model_copy(update={"encoders": encoders, "vae": portable_location(self.vae, root)})
        kept = [f"encoder {e.name!r} at {e.path}" for e in encoders if not is_portable(e.path)]
        if not is_portable(spec.vae):
            kept.append(f"VAE at {spec.vae}")
        return spec, kept

    def resolved(self, root: str | Path) -> PipelineSpec:
        """This spec with every location turned into a local directory under `root` (ModelLocationError if
        one is missing): what `PromptEncoder` and `AutoencoderKL.from_pretrained` are given."""
        encoders = [
            e.model_copy(update={"path": resolve_location(e.path, root, f"encoder {e.name!r}")})
            for e in self.encoders
        ]
        return self.model_copy(update={"encoders": encoders, "vae": resolve_location(self.vae, root, "VAE")})


def vae_scale(vae: AutoencoderKL) -> int:
    """Pixels per latent cell of a diffusers AutoencoderKL."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _channel_stats(vae: AutoencoderKL, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel (mean, std) as (1, C, 1, 1) tensors when the VAE config has `latents_mean`/`latents_std`."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, len(mean), 1, 1)
    return (
        torch.tensor(mean, dtype=z.dtype, device=z.device).view(shape),
        torch.tensor(std, dtype=z.dtype, device=z.device).view(shape),
    )


def latents_to_vae_space(latents: torch.Tensor, vae: AutoencoderKL) -> torch.Tensor:
    """Undo `vae_to_latents`."""
    stats = _channel_stats(vae, latents)
    if stats is not None:
        return latents * stats[1] / vae.config.scaling_factor + stats[0]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return latents / vae.config.scaling_factor + shift


def vae_to_latents(z: torch.Tensor, vae: AutoencoderKL) -> torch.Tensor:
    """Scale raw VAE latents to the unit-variance space the generator is trained in.

    With `latents_mean` / `latents_std` in the VAE config (diffusers' per-channel convention, as in SDXL and
    Wan): `(z - mean_c) / std_c * scaling_factor`, so every channel weighs the same in the loss. Otherwise
    one shift and scale for all channels: `(z - shift_factor) * scaling_factor`.
    """
    stats = _channel_stats(vae, z)
    if stats is not None:
        return (z - stats[0]) / stats[1] * vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


class LiDiTPipeline:
    """Prompt encoders + generator + sampler + VAE decoder."""

    def __init__(
        self,
        generator: LiDiTGenerator,
        vae: AutoencoderKL | None,
        objective: ObjectiveName,
        encoders: list[PromptEncoder] | None = None,
        sampler: str | None = None,
        device: str | torch.device = "cpu",
        flow_shift: float = 1.0,
    ) -> None:
        self.generator = generator.eval()
        self.flow_shift = flow_shift
        self.vae = vae.eval() if vae is not None else None
        self.objective = objective
        self.encoders = encoders or []
        self.sampler = sampler or DEFAULT_SAMPLER[objective]
        self.device = torch.device(device)
        if self.encoders:
            names = [e.name for e in self.encoders]
            expected = [e.name for e in generator.config.encoders]
            if names != expected:
                raise ValueError(f"encoders {names} do not match the generator's branches {expected}")

    # -- loading -----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        load_encoders: bool = True,
        check_fingerprints: bool = True,
        models_root: str | Path | None = None,
    ) -> LiDiTPipeline:
        """Load an exported pipeline directory; encoders and VAE are loaded from the locations it references,
        resolved under `models_root` (default: `lidit.locations.models_root()`)."""
        directory = Path(directory)
        spec = read_spec(directory).resolved(resolve_root(models_root))
        generator = LiDiTGenerator.from_pretrained(directory / GENERATOR_DIR, device=device)
        vae = AutoencoderKL.from_pretrained(spec.vae).to(device)
        encoders = [PromptEncoder(cfg, device=device) for cfg in spec.encoders] if load_encoders else None
        if check_fingerprints:
            check_spec_fingerprints(spec, encoders)
        return cls(generator, vae, spec.objective, encoders, spec.sampler, device, spec.flow_shift)

    def save_pretrained(self, directory: str | Path, spec: PipelineSpec) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.generator.save_pretrained(directory / GENERATOR_DIR)
        (directory / PIPELINE_CONFIG).write_text(spec.model_dump_json(indent=2))

    # -- text --------------------------------------------------------------------------------------------

    def encode(self, prompts: list[str]) -> list[TextFeatures]:
        """Per encoder, generator-ready features for `prompts`."""
        if not self.encoders:
            raise RuntimeError("this pipeline was loaded without encoders; pass text features instead")
        return [enc.features(prompts) for enc in self.encoders]

    # -- sampling ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        texts: list[TextFeatures],
        uncond: list[TextFeatures] | None,
        seeds: list[int],
        latent_height: int,
        latent_width: int,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
    ) -> torch.Tensor:
        """Run the sampler. One seed per row makes each image independent of its batch-mates."""
        b = len(seeds)
        c = self.generator.config.latent_channels
        noise = [
            torch.randn(1, c, latent_height, latent_width, generator=torch.Generator().manual_seed(int(s)))
            for s in seeds
        ]
        scheduler = make_scheduler(self.objective, self.sampler, self.flow_shift)
        scheduler.set_timesteps(num_inference_steps)
        # FlowMatch schedulers start from unit noise and have no init_noise_sigma / scale_model_input.
        latents = (torch.cat(noise) * getattr(scheduler, "init_noise_sigma", 1.0)).to(self.device)
        texts = [t.to(self.device) for t in texts]
        use_cfg = uncond is not None and guidance_scale != 1.0
        if use_cfg:
            both = [TextFeatures.cat([c_, u.to(self.device)]) for c_, u in zip(texts, uncond, strict=True)]
        for t in scheduler.timesteps:
            model_in = (
                scheduler.scale_model_input(latents, t)
                if hasattr(scheduler, "scale_model_input")
                else latents
            )
            if use_cfg:
                pred = self.generator(
                    torch.cat([model_in, model_in]), t.float().expand(2 * b).to(self.device), both
                )
                cond, un = pred.chunk(2)
                pred = un + guidance_scale * (cond - un)
            else:
                pred = self.generator(model_in, t.float().expand(b).to(self.device), texts)
            latents = scheduler.step(pred, t, latents).prev_sample
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        if self.vae is None:
            raise RuntimeError("no VAE loaded")
        z = latents_to_vae_space(latents, self.vae).to(self.vae.dtype)
        return to_pil(self.vae.decode(z).sample.float())

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Validate an image size and return its latent size."""
        scale = vae_scale(self.vae) if self.vae is not None else 1
        multiple = scale * self.generator.config.patch_size
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"image size {width}x{height} must be positive multiples of {multiple}")
        return height // scale, width // scale

    @staticmethod
    def unconditional(
        texts: list[TextFeatures],
        negative: list[TextFeatures] | None = None,
        has_negative: torch.Tensor | None = None,
    ) -> list[TextFeatures]:
        """CFG's unconditional branch, per encoder: a row's negative prompt, or else the empty prompt.

        The empty prompt is the prefix alone (prompt tokens masked): exactly what CFG dropout trains for.
        `has_negative` (B,) marks rows whose `negative` features hold a real negative prompt (default: all
        rows when `negative` is given); the other rows of `negative` are ignored.
        """
        if negative is None:
            return [t.drop_prompt(torch.ones(t.mask.shape[0], dtype=torch.bool)) for t in texts]
        if has_negative is None:
            return negative
        return [n.drop_prompt(~has_negative.bool()) for n in negative]

    def generate_from_features(
        self,
        texts: list[TextFeatures],
        seeds: list[int],
        height: int,
        width: int,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        negative: list[TextFeatures] | None = None,
        has_negative: torch.Tensor | None = None,
    ) -> list[Image.Image]:
        """Text features -> images: the one CFG + sampling + decode path (`__call__` and serving run it)."""
        lh, lw = self.latent_size(height, width)
        uncond = self.unconditional(texts, negative, has_negative) if guidance_scale != 1.0 else None
        latents = self.sample(texts, uncond, seeds, lh, lw, num_inference_steps, guidance_scale)
        return self.decode(latents)

    def __call__(
        self,
        prompts: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        seed: int = 0,
        height: int = 64,
        width: int = 64,
        num_images_per_prompt: int = 1,
    ) -> list[Image.Image]:
        """Generate images; image k of the batch uses seed `seed + k` (reproducible per image)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.latent_size(height, width)  # a bad size fails before the LLMs run
        negative = None
        if guidance_scale != 1.0 and negative_prompt:
            neg = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
            negative = self.encode([n for n in neg for _ in range(num_images_per_prompt)])
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        texts = self.encode(prompts)
        seeds = [seed + k for k in range(len(prompts))]
        return self.generate_from_features(
            texts, seeds, height, width, num_inference_steps, guidance_scale, negative
        )


def read_spec(directory: str | Path) -> PipelineSpec:
    file = Path(directory) / PIPELINE_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{directory} is not a LI-DiT pipeline directory (no {PIPELINE_CONFIG})")
    return PipelineSpec.model_validate(json.loads(file.read_text()))


def check_spec_fingerprints(spec: PipelineSpec, encoders: list[PromptEncoder] | None) -> None:
    """Refuse to serve with encoders or a VAE that differ from the ones the generator was trained on.

    `spec` is resolved (local paths). Raises `FingerprintMismatchError`, one line naming the model and where
    it was found.
    """
    for enc in encoders or []:
        want = spec.encoder_fingerprints.get(enc.name)
        if want and want != enc.fingerprint:
            raise FingerprintMismatchError(
                f"encoder {enc.name!r} at {enc.config.path} has fingerprint {enc.fingerprint}, "
                f"but the generator was trained on {want}"
            )
    if spec.vae_fingerprint:
        got = hash_model_dir(spec.vae)[:16]
        if got != spec.vae_fingerprint:
            raise FingerprintMismatchError(
                f"VAE at {spec.vae} has fingerprint {got}, but the generator was trained on {spec.vae_fingerprint}"
            )
