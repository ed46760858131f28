"""Building blocks shared by the refiners and the LI-DiT backbone: attention with QK RMSNorm and key
masks, MLPs, adaLN modulation helpers and masked pooling. Single-device PyTorch, no distributed code."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x * (1 + scale) + shift` with (B, D) modulation broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin-cos embedding of positions (N,) -> (N, dim): sin then cos at dim/2 geometric frequencies."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    half = dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens: x (B, T, D), mask (B, T) bool -> (B, D); rows with no valid token give 0."""
    weights = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    total = (x * weights).sum(dim=1)  # (B, D)
    return total / weights.sum(dim=1).clamp(min=1.0)


class Attention(nn.Module):
    """Multi-head attention (self or cross) with optional QK RMSNorm and a boolean key-padding mask.

    Queries whose every key is masked (a sample with no valid context) output zeros instead of NaN.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)
        # QK RMSNorm keeps attention logits bounded when text features have large norms (LLM states do).
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        causal: bool = False,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, N, D); context (B, S, Dc) or None for self-attention; key_mask (B, S) bool, True = attend;
        bias (B, H, N, S) added to the attention logits of the keys attended to."""
        context = x if context is None else context
        b, n, _ = x.shape
        s = context.shape[1]
        q = self.to_q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        k, v = self.to_kv(context).view(b, s, 2, self.heads, self.head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, hd)
        q, k = self.q_norm(q), self.k_norm(k)

        mask = None
        empty = None
        if key_mask is not None or causal:
            mask = torch.ones(b, 1, n, s, dtype=torch.bool, device=x.device)
            if key_mask is not None:
                mask = mask & key_mask[:, None, None, :].bool()
            if causal:
                mask = mask & torch.ones(n, s, dtype=torch.bool, device=x.device).tril()
            empty = ~mask.any(dim=-1, keepdim=True)  # (B, 1, N, 1)
            mask = mask | empty  # avoid NaN softmax; those rows are zeroed below
        if bias is not None:
            bias = bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, hd)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, D)
        return self.to_out(out)


# `GeneratorConfig.mlp_activation` -> `nn.GELU(approximate=...)`: no weight depends on the choice.
MLPActivation = Literal["gelu_tanh", "gelu"]
MLP_ACTIVATIONS: dict[MLPActivation, str] = {"gelu_tanh": "tanh", "gelu": "none"}


class MLP(nn.Module):
    """Linear -> GELU -> Linear, the DiT feed-forward: `activation` gelu_tanh (DiT's tanh approximation) or gelu
    (exact, erf). With `grid_conv`, a depthwise 3x3 conv over the token grid between the linears (SANA's
    Mix-FFN): every block mixes neighbouring tokens, the locality a DiT otherwise learns from data; `forward`
    then needs the grid."""

    def __init__(
        self, dim: int, ratio: float = 4.0, grid_conv: bool = False, activation: MLPActivation = "gelu_tanh"
    ) -> None:
        super().__init__()
        if activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"unknown MLP activation {activation!r}; choose one of {', '.join(MLP_ACTIVATIONS)}"
            )
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden) if grid_conv else None
        self.act = nn.GELU(approximate=MLP_ACTIVATIONS[activation])
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, N, D); `grid` (h, w) with h * w = N, tokens row-major (only read with `grid_conv`)."""
        h = self.fc1(x)
        if self.conv is not None:
            b, n, hidden = h.shape
            # Channels-last views both ways: the conv reads and writes the token layout without a copy
            # (a contiguous NCHW round trip cost a copy of the hidden activations each way).
            h = self.conv(h.view(b, *grid, hidden).permute(0, 3, 1, 2))  # (B, hidden, h, w), channels-last
            h = h.permute(0, 2, 3, 1).reshape(b, n, hidden)  # (B, N, hidden)
        return self.fc2(self.act(h))


class AdaLN(nn.Module):
    """SiLU -> zero-initialised Linear producing `chunks` (B, D) modulation vectors (adaLN-Zero)."""

    def __init__(self, cond_dim: int, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(cond_dim, chunks * dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Zero init: every gate starts at 0 so each residual branch starts switched off.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c)).chunk(self.chunks, dim=-1)
