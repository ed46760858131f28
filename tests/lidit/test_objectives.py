from __future__ import annotations

import pytest
import torch

from lidit.objectives import cfg_drop_mask, ddpm_scheduler, make_scheduler, training_targets


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
