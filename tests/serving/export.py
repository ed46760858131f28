"""Tiny pipeline exports and a real MLflow registry for serving tests and the serving benchmark.

Everything goes through the real formats: LMs and VAE via `save_pretrained`, the generator via
`LiDiTPipeline.save_pretrained`, versions via `lidit.registry.register_pipeline`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from lidit.encoder import EncoderConfig, PromptEncoder
from lidit.generator import GeneratorConfig, LiDiTGenerator
from lidit.pipeline import LiDiTPipeline, PipelineSpec
from tests.lidit.tiny_lms import build_tiny_lms, save_tiny_vae


def build_shared_assets(root: Path) -> tuple[list[PromptEncoder], Path]:
    """Two tiny LMs (llama + qwen) and a tiny random VAE (64x64 -> 4x32x32), saved under `root`."""
    paths = build_tiny_lms(root / "lms")
    save_tiny_vae(root / "vae")
    encoders = [PromptEncoder(EncoderConfig(name=n, path=str(paths[n]))) for n in ("llama", "qwen")]
    return encoders, root / "vae"


def build_export(
    out: Path, encoders: list[PromptEncoder], vae_dir: Path, seed: int, models_root: Path | None = None
) -> Path:
    """A pipeline export whose generator weights depend on `seed` (so versions are told apart by output).

    With `models_root`, encoders and VAE are named by portable `lidit-models://` locations under it, as
    training exports them."""
    torch.manual_seed(seed)
    gen = LiDiTGenerator(GeneratorConfig.from_preset("tiny", [e.branch_spec() for e in encoders]))
    for name, p in gen.named_parameters():  # make the output depend on text and seed, as training would
        if "ada" in name or "final.linear" in name:
            torch.nn.init.normal_(p, std=0.05)
    pipe = LiDiTPipeline(gen, AutoencoderKL.from_pretrained(vae_dir), "epsilon", encoders)
    spec = PipelineSpec(
        objective="epsilon",
        encoders=[e.config for e in encoders],
        encoder_fingerprints={e.name: e.fingerprint for e in encoders},
        vae=str(vae_dir),
        extra={"seed": str(seed)},
    )
    if models_root is not None:
        spec, absolute = spec.portable(models_root)
        assert not absolute, absolute
    pipe.save_pretrained(out, spec)
    return out


def register_exports(exports: list[Path], name: str, experiment: str = "serving-tests") -> list[str]:
    """Log each export as artifact `pipeline` of its own run and register it; the first gets @production."""
    import mlflow

    from lidit.registry import PIPELINE_ARTIFACT, configure_mlflow, register_pipeline

    configure_mlflow(experiment)
    versions = []
    for i, export in enumerate(exports):
        with mlflow.start_run(run_name=f"export-{i}") as run:
            mlflow.log_artifacts(str(export), artifact_path=PIPELINE_ARTIFACT)
        versions.append(register_pipeline(run.info.run_id, name, alias="production" if i == 0 else None))
    return versions
