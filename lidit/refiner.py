"""The linguistic token refiner (one per LLM) and the collaborative refiner (fuses 2+ LLMs).

LI-DiT, section 3: decoder-only LLM states carry a causal, positional bias; a small *bidirectional*
transformer over each LLM's tokens lets every token see the whole prompt. Gates come from a zero-initialised
projection of c = timestep embedding + MLP(masked mean of the raw LLM states), so at init the refiner is the
identity on the projected tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from lidit.layers import MLP, AdaLN, Attention, masked_mean, modulate


class TokenRefinerBlock(nn.Module):
    """LayerNorm -> self-attention -> gated residual; LayerNorm -> MLP -> gated residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal  # True only for the paper's causal-mask ablation
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio)
        self.gates = AdaLN(dim, dim, chunks=2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gate_attn, gate_mlp = self.gates(c)  # (B, D) each
        x = x + gate_attn.unsqueeze(1) * self.attn(self.norm1(x), key_mask=mask, causal=self.causal)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(self.norm2(x))
        return x  # (B, T, D)


class LinguisticTokenRefiner(nn.Module):
    """Project one LLM's states to the model width and refine them bidirectionally.

    `depth=0` gives the "raw LLM states" ablation: projection only.
    """

    def __init__(
        self,
        llm_dim: int,
        dim: int,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(llm_dim, dim)
        self.pool_mlp = nn.Sequential(nn.Linear(llm_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(TokenRefinerBlock(dim, heads, mlp_ratio, causal) for _ in range(depth))

    def condition(self, states: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """c = t_emb + MLP(masked mean of the raw LLM states): (B, D)."""
        return t_emb + self.pool_mlp(masked_mean(states, mask))

    def forward(
        self, states: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor, c: torch.Tensor | None = None
    ) -> torch.Tensor:
        """states (B, T, Dllm), mask (B, T) bool, t_emb (B, D) -> refined tokens (B, T, D).

        `c` is `condition(states, mask, t_emb)`; pass it when the caller already computed it.
        """
        c = self.condition(states, mask, t_emb) if c is None else c  # (B, D)
        x = self.proj(states)  # (B, T, D)
        for block in self.blocks:
            x = block(x, mask, c)
        return x


class CollaborativeBlock(nn.Module):
    """One branch's update: cross-attend from its own tokens to the other branches' tokens, then an MLP;
    each sub-layer modulated (shift/scale before, gate after) by c, zero-init so it starts as identity."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross = Attention(dim, heads, qk_norm=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio)
        self.ada = AdaLN(dim, dim, chunks=6)

    def forward(
        self, x: torch.Tensor, others: torch.Tensor, others_mask: torch.Tensor, c: torch.Tensor
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)
        h = self.cross(modulate(self.norm1(x), shift1, scale1), context=others, key_mask=others_mask)
        x = x + gate1.unsqueeze(1) * h
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x  # (B, T_i, D)


class CollaborativeRefiner(nn.Module):
    """Fuses K >= 2 refined branches: each branch queries the concatenation of all the others."""

    def __init__(self, num_branches: int, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if num_branches < 2:
            raise ValueError("the collaborative refiner needs at least two LLM branches")
        self.blocks = nn.ModuleList(CollaborativeBlock(dim, heads, mlp_ratio) for _ in range(num_branches))

    def forward(
        self, branches: list[torch.Tensor], masks: list[torch.Tensor], c: torch.Tensor
    ) -> list[torch.Tensor]:
        """All branches update from the same input snapshot, so branch order does not matter."""
        out = []
        for i, block in enumerate(self.blocks):
            others = torch.cat([b for j, b in enumerate(branches) if j != i], dim=1)  # (B, S, D)
            others_mask = torch.cat([m for j, m in enumerate(masks) if j != i], dim=1)  # (B, S)
            out.append(block(branches[i], others, others_mask, c))
        return out
