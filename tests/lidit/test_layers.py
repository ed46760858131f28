"""Shared layers (`lidit.layers`)."""

from __future__ import annotations

import pytest
import torch

from lidit.layers import MLP


def test_grid_conv_mlp_mixes_grid_neighbours_only() -> None:
    """Tokens are row-major on an h x w grid: a change at (1, 2) of a 3 x 5 grid reaches its 3x3
    neighbourhood and nothing else (a wrong reshape would reach other tokens, or miss some)."""
    torch.manual_seed(0)
    mlp = MLP(8, ratio=2.0, grid_conv=True)
    grid = (3, 5)
    x = torch.randn(1, 15, 8)
    changed = x.clone()
    changed[0, 1 * 5 + 2] += 1.0
    moved = (mlp(changed, grid) - mlp(x, grid)).abs().sum(-1)[0].view(grid) > 0
    expected = torch.zeros(grid, dtype=torch.bool)
    expected[0:3, 1:4] = True
    assert torch.equal(moved, expected)


def test_mlp_activation_is_exact_or_tanh_gelu_and_nothing_else() -> None:
    x = torch.linspace(-4, 4, 81).view(1, 81, 1)
    exact, tanh = MLP(1, activation="gelu"), MLP(1, activation="gelu_tanh")
    assert torch.equal(exact.act(x), torch.nn.functional.gelu(x))
    assert torch.equal(tanh.act(x), torch.nn.functional.gelu(x, approximate="tanh"))
    with pytest.raises(ValueError, match="unknown MLP activation 'relu'; choose one of gelu_tanh, gelu"):
        MLP(1, activation="relu")
