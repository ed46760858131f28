"""The LI-DiT backbone: patchify -> residual conv position block -> adaLN-Zero DiT blocks with
self-attention and cross-attention to the fused text tokens (both with QK RMSNorm) -> modulated final layer.

Position: a 2D sin-cos embedding computed on the fly for the token grid at hand (no learned table, so any
latent size divisible by the patch size works, including sizes never seen in training), then the residual
depthwise conv block. The conv alone (zero padding makes only the border tokens distinguishable) left single
objects scattered in fragments; with the sin-cos grid they come out whole.

Optional (`conv_channels` > 0, ours): a conv stem at latent resolution before the patchify and a conditioned
conv head after the final layer, fed the stem's features as a skip (measured in
benchmarks/results/learning_curve.md, recipes `grid8-conv32*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lidit.layers import MLP, AdaLN, Attention, MLPActivation, modulate, sincos_1d


def sincos_2d(dim: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of an h x w token grid (MAE / DiT style): (h*w, dim).

    Half the channels encode the row, half the column, each as sin/cos at geometric frequencies.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    parts = [sincos_1d(pos.flatten(), dim // 2) for pos in (ys, xs)]  # (N, dim/2) each
    return torch.cat(parts, dim=1).to(dtype)  # (N, dim)


def token_positions(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Centre of every token of an h x w grid as (x, y) offsets from the image centre in quarter-image units
    (each in (-2, 2)), row-major like the token sequence: (h*w, 2)."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h * 4 - 2
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w * 4 - 2
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)


class ConvPositionBlock(nn.Module):
    """Residual depthwise 3x3 conv over the token grid (conditional position encoding)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)  # (B, D, h, w)


class LatentResBlock(nn.Module):
    """Residual block at latent resolution (GroupNorm, SiLU, 3x3 conv, twice); with `cond_dim`, the second
    norm is modulated by the condition (scale and shift, zero at init) like a U-Net block's time embedding."""

    def __init__(self, channels: int, cond_dim: int | None = None) -> None:
        super().__init__()
        groups = min(8, channels)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.ada = AdaLN(cond_dim, channels, chunks=2) if cond_dim else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.ada is not None:
            shift, scale = self.ada(c)  # (B, channels) each
            h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return x + self.conv2(F.silu(h))


class DiTBlock(nn.Module):
    """adaLN-Zero block: modulated self-attn, modulated cross-attn to text, modulated MLP, each gated."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        layout_attention: bool = False,
        mlp_conv: bool = False,
        mlp_activation: MLPActivation = "gelu_tanh",
    ) -> None:
        super().__init__()
        # Per head, zero at init: how strongly a text token's layout offset pulls image tokens on its side.
        self.layout_scale = nn.Parameter(torch.zeros(heads)) if layout_attention else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(dim, heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(dim, heads, qk_norm=qk_norm)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio, grid_conv=mlp_conv, activation=mlp_activation)
        self.ada = AdaLN(dim, dim, chunks=9)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        layout_dot: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """`layout_dot` (B, N, S): image token position . text token layout offset (`LiDiT.forward`);
        `grid` (h, w): the token grid, which a grid-conv MLP needs."""
        s1, sc1, g1, s2, sc2, g2, s3, sc3, g3 = self.ada(c)  # (B, D) each
        bias = None
        if self.layout_scale is not None and layout_dot is not None:
            bias = self.layout_scale.view(1, -1, 1, 1) * layout_dot.unsqueeze(1)  # (B, H, N, S)
        x = x + g1.unsqueeze(1) * self.self_attn(modulate(self.norm1(x), s1, sc1))
        h = self.cross_attn(modulate(self.norm2(x), s2, sc2), text, text_mask, bias=bias)
        x = x + g2.unsqueeze(1) * h
        x = x + g3.unsqueeze(1) * self.mlp(modulate(self.norm3(x), s3, sc3), grid)
        return x  # (B, N, D)


class FinalLayer(nn.Module):
    """Modulated LayerNorm + zero-init linear to patch pixels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = AdaLN(dim, dim, chunks=2)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


class LiDiT(nn.Module):
    """The diffusion transformer. Text conditioning arrives already fused (B, S, D) with its mask."""

    def __init__(
        self,
        in_channels: int = 4,
        patch_size: int = 2,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        sincos_position: bool = True,
        layout_attention: bool = False,
        conv_channels: int = 0,
        mlp_conv: bool = False,
        mlp_activation: MLPActivation = "gelu_tanh",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.sincos_position = sincos_position
        self.patch_size = patch_size
        # Optional latent-resolution conv stem and head (ours, not the paper's): the transformer works on
        # p x p patches, the head draws within and across patch borders from its features plus the stem's
        # (a U-Net-like skip of the noisy input at full resolution).
        self.conv_channels = conv_channels
        patch_in = conv_channels or in_channels
        if conv_channels:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, conv_channels, 3, padding=1), LatentResBlock(conv_channels)
            )
            self.head = LatentResBlock(conv_channels, cond_dim=dim)
            self.head_out = nn.Conv2d(conv_channels, in_channels, 3, padding=1)
        self.patch_embed = nn.Conv2d(patch_in, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_block = ConvPositionBlock(dim)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, heads, mlp_ratio, qk_norm, layout_attention, mlp_conv, mlp_activation)
            for _ in range(depth)
        )
        self.final = FinalLayer(dim, patch_size, patch_in)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        text_layout: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W) latents, c (B, D) condition, text (B, S, D), text_mask (B, S) -> (B, C, H, W).

        `text_layout` (B, S, 2): where each text token says its object stands, as an offset from the image
        centre in quarter-image units (x right, y down; 0 = no place). With `layout_attention`, each block's
        cross-attention adds `scale_h * (image token position . offset)` to its logits, so image tokens left
        of the centre lean towards the words of a left object (any resolution: positions are relative)."""
        b, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch size {p}")
        h, w = height // p, width // p
        skip = self.stem(x) if self.conv_channels else None  # (B, K, H, W)
        tokens = self.patch_embed(x if skip is None else skip)  # (B, D, h, w)
        if self.sincos_position:
            pos = sincos_2d(tokens.shape[1], h, w, tokens.device, tokens.dtype)  # (N, D)
            tokens = tokens + pos.T.reshape(1, -1, h, w)
        tokens = self.pos_block(tokens).flatten(2).transpose(1, 2)  # (B, N, D)
        layout_dot = None
        if text_layout is not None:
            grid = token_positions(h, w, tokens.device, tokens.dtype)  # (N, 2)
            layout_dot = torch.einsum("nk,bsk->bns", grid, text_layout.to(tokens.dtype))  # (B, N, S)
        for block in self.blocks:
            tokens = block(tokens, c, text, text_mask, layout_dot, (h, w))
        out = self.final(tokens, c)  # (B, N, p*p*C), C = conv_channels when the head is on
        channels = self.conv_channels or self.in_channels
        out = out.view(b, h, w, p, p, channels)
        out = torch.einsum("bhwpqc->bchpwq", out).reshape(b, channels, height, width)
        if skip is None:
            return out
        return self.head_out(self.head(out + skip, c))  # (B, C, H, W)
