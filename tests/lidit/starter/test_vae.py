from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL

from lidit.pipeline import latents_to_vae_space, vae_to_latents
from lidit.starter import iter_split
from lidit.starter.vae import to_tensor


def test_vae_loads_and_maps_64px_to_4x16x16(starter_micro) -> None:
    assert (starter_micro.vae / "diffusion_pytorch_model.safetensors").is_file()
    vae = AutoencoderKL.from_pretrained(starter_micro.vae)
    metrics = starter_micro.summary["stages"]["vae"]["metrics"]
    assert vae.config.latents_mean == metrics["latents_mean"] and len(metrics["latents_mean"]) == 4
    assert vae.config.latents_std == metrics["latents_std"] and vae.config.scaling_factor == 1.0
    rows = list(iter_split(starter_micro, "heldout", limit=4))
    x = to_tensor(np.stack([np.asarray(r["image"]) for r in rows]))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample
    assert z.shape == (4, 4, 16, 16) and rec.shape == x.shape
    # Per-channel mean and std standardise every channel of the posterior means they were measured on.
    zs = vae_to_latents(z, vae)
    assert zs.mean(dim=(0, 2, 3)).abs().max() < 1.0
    assert ((zs.std(dim=(0, 2, 3)) > 0.3) & (zs.std(dim=(0, 2, 3)) < 3.0)).all()
    torch.testing.assert_close(latents_to_vae_space(zs, vae), z)
    assert metrics["latent_shape"] == [4, 16, 16]
    assert np.isfinite(metrics["heldout_psnr_db"]) and 0 <= metrics["evaluator_on_reconstructions"] <= 1
