"""The starter `AutoencoderKL`: a tiny diffusers VAE trained briefly to reconstruct the starter images."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lidit.starter.config import VAEConfig


def build_vae(cfg: VAEConfig, image_size: int) -> Any:
    """A freshly initialised `AutoencoderKL`; each level after the first halves the side (3 levels: /4)."""
    from diffusers import AutoencoderKL

    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=image_size,
        mid_block_add_attention=cfg.mid_block_attention,  # attention at 16x16 costs time and buys little here
    )


def to_tensor(images: np.ndarray) -> Any:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the range diffusers VAEs expect."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def psnr_db(vae: Any, images: Any, batch_size: int = 64) -> float:
    """PSNR (dB, images in [0, 1]) of the deterministic reconstruction (posterior mode) of `images` in [-1, 1]."""
    import torch

    se, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            se += float(((rec - x) / 2).pow(2).sum())
            n += x.numel()
    return 10 * math.log10(1.0 / max(se / n, 1e-12))


def reconstruct(vae: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 (N, H, W, 3) -> its deterministic VAE round trip, uint8 (N, H, W, 3)."""
    import torch

    x = to_tensor(images)
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            rec = vae.decode(vae.encode(x[i : i + batch_size]).latent_dist.mode()).sample
            outs.append(((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(outs)


def latent_stats(vae: Any, images: Any, batch_size: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the posterior means of `images`."""
    import torch

    with torch.no_grad():
        z = torch.cat(
            [
                vae.encode(images[i : i + batch_size]).latent_dist.mode()
                for i in range(0, len(images), batch_size)
            ]
        )
    return z.mean(dim=(0, 2, 3)).tolist(), z.std(dim=(0, 2, 3)).tolist()


def train_vae(
    train_images: np.ndarray,
    eval_images: np.ndarray,
    cfg: VAEConfig,
    seed: int,
    log: Callable[[str], None] = lambda _msg: None,
) -> tuple[Any, dict[str, Any]]:
    """Train the VAE on uint8 (N, H, W, 3) images; returns it with per-channel `latents_mean` / `latents_std` set
    (so `lidit.pipeline.vae_to_latents` standardises every channel) and its metrics.

    The first `crop_fraction` of steps train on random crops (cheaper per shape seen), the rest on full images.
    Loss: pixel MSE (what PSNR measures) + a small KL term on sampled latents, so the posterior variance
    learns to be small and `latent_dist.sample()` stays close to `mode()` for whoever encodes with it.
    """
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = build_vae(cfg, train_images.shape[1])
    data = to_tensor(train_images)
    held = to_tensor(eval_images)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    down = 2 ** (len(cfg.block_out_channels) - 1)
    side = train_images.shape[1]
    crop = min(cfg.crop_size, side) // down * down
    crop_steps = round(cfg.crop_fraction * cfg.steps) if cfg.crop_size and crop < side else 0

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 2%
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))

    vae.train()
    t0 = time.perf_counter()
    rec_val = float("nan")
    for step in range(cfg.steps):
        if step < crop_steps:
            x = data[torch.randint(0, len(data), (cfg.crop_batch_size,), generator=gen)]
            # Offsets on the latent grid, so a crop's latents are a crop of the full image's latents.
            oy, ox = (torch.randint(0, (side - crop) // down + 1, (2,), generator=gen) * down).tolist()
            x = x[:, :, oy : oy + crop, ox : ox + crop]
        else:
            x = data[torch.randint(0, len(data), (cfg.batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)
        rec = (vae.decode(z).sample - x).pow(2).mean()
        # KL summed per image, normalised like the per-value MSE so kl_weight is per pixel value (as in LDM).
        loss = rec + cfg.kl_weight * post.kl().mean() / x[0].numel()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec_val = float(rec.detach())
        if (step + 1) % max(1, cfg.steps // 6) == 0 or step + 1 == cfg.steps:
            approx = 10 * math.log10(4.0 / max(rec_val, 1e-12))  # batch PSNR of the sampled reconstruction
            log(
                f"vae: step {step + 1}/{cfg.steps} mse {rec_val:.5f} (~{approx:.1f} dB) ({time.perf_counter() - t0:.1f}s)"
            )
    vae.eval()
    psnr = psnr_db(vae, held)
    mean, std = latent_stats(vae, held)
    # Standardised latents have zero mean and unit variance per channel: what diffusion noise schedules assume.
    # One scale for all channels left them at std 0.26 / 0.75 / 0.87 / 0.93, so the first channel weighed 13x
    # less than the last in the loss; diffusers' latents_mean / latents_std (see lidit.pipeline.vae_to_latents)
    # standardise each channel.
    std = [max(s, 1e-6) for s in std]
    vae.register_to_config(scaling_factor=1.0, shift_factor=None, latents_mean=mean, latents_std=std)
    n_params = sum(p.numel() for p in vae.parameters())
    metrics = {
        "params": n_params,
        "latent_shape": [cfg.latent_channels, side // down, side // down],
        "heldout_psnr_db": round(psnr, 2),
        "latents_mean": mean,  # per channel, of the posterior means; exact: also in the saved config
        "latents_std": std,
        "train_mse_last": round(rec_val, 6),
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    return vae, metrics
