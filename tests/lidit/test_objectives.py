from __future__ import annotations

import pytest
import torch

from lidit.objectives import (
    SAMPLERS,
    cfg_drop_mask,
    ddpm_scheduler,
    foreground_weights,
    make_scheduler,
    shift_sigmas,
    training_targets,
)


def test_flow_targets_follow_the_straight_path() -> None:
    x0 = torch.randn(4, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    tt = training_targets("flow", x0, g)
    sigma = (tt.timesteps / 1000).view(-1, 1, 1, 1)
    noise = tt.target + x0
    torch.testing.assert_close(tt.noisy, (1 - sigma) * x0 + sigma * noise)
    assert ((tt.timesteps > 0) & (tt.timesteps < 1000)).all()


def test_epsilon_targets_match_ddpm_add_noise() -> None:
    x0 = torch.randn(4, 4, 8, 8)
    tt = training_targets("epsilon", x0, torch.Generator().manual_seed(1))
    expected = ddpm_scheduler().add_noise(x0, tt.target, tt.timesteps.long())
    torch.testing.assert_close(tt.noisy, expected)
    assert tt.timesteps.dtype == torch.float32


def test_cfg_drop_rate_and_validation() -> None:
    drops = cfg_drop_mask(20000, 0.1, torch.Generator().manual_seed(0))
    assert abs(drops.float().mean().item() - 0.1) < 0.01
    assert not cfg_drop_mask(100, 0.0).any()
    with pytest.raises(ValueError):
        cfg_drop_mask(4, 1.5)


def test_sampler_must_fit_objective() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        make_scheduler("flow", "ddim")
    assert type(make_scheduler("epsilon")).__name__ == "DDIMScheduler"


class _OracleGenerator(torch.nn.Module):
    """Predicts the exact epsilon / velocity that leads back to one known latent `x0`."""

    def __init__(self, x0: torch.Tensor, objective: str) -> None:
        super().__init__()
        self.x0, self.objective = x0, objective
        self.config = type("Cfg", (), {"latent_channels": x0.shape[1]})()
        self.alphas = ddpm_scheduler().alphas_cumprod

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, texts: list) -> torch.Tensor:
        x0 = self.x0.expand_as(latents)
        if self.objective == "flow":
            sigma = (timesteps / 1000).view(-1, 1, 1, 1)
            return (latents - x0) / sigma  # v = noise - x0
        ab = self.alphas[timesteps.long()].view(-1, 1, 1, 1)
        return (latents - ab.sqrt() * x0) / (1 - ab).sqrt()  # epsilon


@pytest.mark.parametrize(("objective", "sampler"), [(o, s) for o, ss in SAMPLERS.items() for s in ss])
def test_samplers_never_clip_latents(objective: str, sampler: str) -> None:
    """Scaled VAE latents have tails beyond +-2: a sampler fed the exact prediction must return the latent
    unchanged (diffusers' pixel-space default clip_sample=True clamps x0 to [-1, 1] at every step)."""
    from lidit.pipeline import LiDiTPipeline

    x0 = torch.linspace(-3.0, 3.0, 4 * 8 * 8).view(1, 4, 8, 8)
    pipe = LiDiTPipeline(_OracleGenerator(x0, objective), None, objective, sampler=sampler)
    out = pipe.sample([], None, seeds=[0, 1], latent_height=8, latent_width=8, num_inference_steps=10)
    torch.testing.assert_close(out, x0.expand(2, -1, -1, -1), atol=2e-3, rtol=1e-3)


def test_flow_shift_trains_where_sampling_starts() -> None:
    """uniform + shift 3 puts a quarter of the rows at sigma > 0.9 (logit-normal(0, 1): 1.4%), with the same
    sigma map as the sampler's shift."""
    x0 = torch.zeros(20000, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    shifted = training_targets("flow", x0, g, flow_shift=3.0).timesteps / 1000
    assert abs((shifted > 0.9).float().mean().item() - 0.25) < 0.01
    plain = training_targets("flow", x0, g, flow_shift=1.0, timestep_sampling="logit_normal").timesteps / 1000
    assert (plain > 0.9).float().mean().item() < 0.02
    scheduler = make_scheduler("flow", flow_shift=3.0)
    scheduler.set_timesteps(10)
    u = torch.linspace(
        1.0, 0.0, 10
    )  # about FlowMatchEuler's unshifted sigmas (its tail end differs a little)
    torch.testing.assert_close(scheduler.sigmas[:5], shift_sigmas(u[:5], 3.0), atol=3e-3, rtol=0)
    with pytest.raises(ValueError, match="timestep sampling"):
        training_targets("flow", x0[:2], g, timestep_sampling="beta")


def test_foreground_weights_count_objects_and_their_rim() -> None:
    x0 = torch.full((2, 4, 12, 12), -0.3)  # a background that is not zero: measured from the median
    x0[0, :, 4:7, 4:7] = 2.0  # one 3x3 object in image 0; image 1 is all background
    weights = foreground_weights(x0, strength=4.0)
    assert weights.shape == (2, 1, 12, 12)
    assert weights.mean().item() == pytest.approx(1.0)
    background = weights[1, 0, 0, 0].item()
    rim = torch.zeros(12, 12, dtype=torch.bool)
    rim[3:8, 3:8] = True  # the object dilated by one latent pixel: where another shape would differ
    assert torch.allclose(weights[0, 0][rim], torch.tensor(5 * background))
    assert torch.allclose(weights[0, 0][~rim], torch.tensor(background))
    assert torch.allclose(weights[1], torch.tensor(background))
    # A faint object counts in proportion to its distance from the background, up to `scale`.
    x0[0, :, 4:7, 4:7] = -0.3 + 0.25  # channel-L2 distance 0.5 over 4 channels
    faint = foreground_weights(x0, strength=4.0)
    assert (faint[0, 0, 5, 5] / faint[1, 0, 0, 0]).item() == pytest.approx(3.0)
    assert torch.equal(foreground_weights(x0, strength=0.0), torch.ones(2, 1, 12, 12))
    with pytest.raises(ValueError, match="foreground strength"):
        foreground_weights(x0, strength=-1.0)
