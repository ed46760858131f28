from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL

from lidit.starter import iter_split
from lidit.starter.vae import to_tensor


def test_vae_loads_and_maps_64px_to_4x16x16(starter_micro) -> None:
    assert (starter_micro.vae / "diffusion_pytorch_model.safetensors").is_file()
    vae = AutoencoderKL.from_pretrained(starter_micro.vae)
    metrics = starter_micro.summary["stages"]["vae"]["metrics"]
    assert vae.config.scaling_factor == metrics["scaling_factor"] != 0.18215
    assert vae.config.shift_factor == metrics["shift_factor"]
    rows = list(iter_split(starter_micro, "heldout", limit=4))
    x = to_tensor(np.stack([np.asarray(r["image"]) for r in rows]))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample
    assert z.shape == (4, 4, 16, 16) and rec.shape == x.shape
    # The shift and scale standardise the posterior means they were measured on (the first held-out images).
    zs = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(float(zs.mean())) < 1.0 and 0.3 < float(zs.std()) < 3.0
    assert metrics["latent_shape"] == [4, 16, 16]
    assert np.isfinite(metrics["heldout_psnr_db"]) and 0 <= metrics["evaluator_on_reconstructions"] <= 1
