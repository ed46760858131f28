"""The linguistic token refiner (one per LLM) and the collaborative refiner (fuses 2+ LLMs).

LI-DiT, section 3: decoder-only LLM states carry a causal, positional bias; a small *bidirectional*
transformer over each LLM's tokens lets every token see the whole prompt. Gates come from a zero-initialised
projection of c = timestep embedding + MLP(masked mean of the raw LLM states), so at init the refiner is the
identity on the projected tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from lidit.layers import MLP, AdaLN, Attention, MLPActivation, masked_mean, modulate, sincos_1d


class TokenRefinerBlock(nn.Module):
    """LayerNorm -> self-attention -> gated residual; LayerNorm -> MLP -> gated residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        causal: bool = False,
        mlp_activation: MLPActivation = "gelu_tanh",
    ) -> None:
        super().__init__()
        self.causal = causal  # True only for the paper's causal-mask ablation
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio, activation=mlp_activation)
        self.gates = AdaLN(dim, dim, chunks=2)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        c: torch.Tensor,
        keep_from: int = 0,
        position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T - keep_from, D): only tokens from `keep_from` on are computed (as queries;
        every token stays a key), for a last block whose earlier outputs nobody reads. `position` (T, D) is
        added to the attention input only, so the residual stream (and the identity at init) is unchanged."""
        gate_attn, gate_mlp = self.gates(c)  # (B, D) each
        h = self.norm1(x)
        if position is not None:
            h = h + position.to(h.dtype)
        q = h[:, keep_from:]
        if self.causal:  # queries from keep_from on see keys up to their own position
            attn = self.attn(h, key_mask=mask, causal=True)[:, keep_from:]
        else:
            attn = self.attn(q, context=h, key_mask=mask)
        x = x[:, keep_from:] + gate_attn.unsqueeze(1) * attn
        x = x + gate_mlp.unsqueeze(1) * self.mlp(self.norm2(x))
        return x  # (B, T - keep_from, D)


class LinguisticTokenRefiner(nn.Module):
    """Project one LLM's states to the model width and refine them bidirectionally.

    `depth=0` gives the "raw LLM states" ablation: projection only. `position=True` adds a sin-cos embedding
    of the token index to every block's attention input: the paper's refiner has none (word order reaches it
    only through the causal LLM states), and relations such as "A left of B" depend on that order.
    """

    def __init__(
        self,
        llm_dim: int,
        dim: int,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        causal: bool = False,
        position: bool = False,
        mlp_activation: MLPActivation = "gelu_tanh",
    ) -> None:
        super().__init__()
        self.position = position
        self.proj = nn.Linear(llm_dim, dim)
        self.pool_mlp = nn.Sequential(nn.Linear(llm_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(
            TokenRefinerBlock(dim, heads, mlp_ratio, causal, mlp_activation) for _ in range(depth)
        )

    def condition(self, states: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """c = t_emb + MLP(masked mean of the raw LLM states): (B, D)."""
        return t_emb + self.pool_mlp(masked_mean(states, mask))

    def forward(
        self,
        states: torch.Tensor,
        mask: torch.Tensor,
        t_emb: torch.Tensor,
        c: torch.Tensor | None = None,
        keep_from: int = 0,
    ) -> torch.Tensor:
        """states (B, T, Dllm), mask (B, T) bool, t_emb (B, D) -> refined tokens (B, T - keep_from, D).

        `c` is `condition(states, mask, t_emb)`; pass it when the caller already computed it. `keep_from`
        returns only the tokens from that index on (the prompt after the prefix): the last block then
        computes only those, the same values as slicing the full output.
        """
        c = self.condition(states, mask, t_emb) if c is None else c  # (B, D)
        x = self.proj(states)  # (B, T, D)
        pos = None
        if self.position:
            pos = sincos_1d(torch.arange(x.shape[1], device=x.device), x.shape[2])  # (T, D)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, c, keep_from if i == len(self.blocks) - 1 else 0, pos)
        return x if self.blocks else x[:, keep_from:]


class CollaborativeBlock(nn.Module):
    """One branch's update: cross-attend from its own tokens to the other branches' tokens, then an MLP;
    each sub-layer modulated (shift/scale before, gate after) by c, zero-init so it starts as identity."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 4.0, mlp_activation: MLPActivation = "gelu_tanh"
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross = Attention(dim, heads, qk_norm=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio, activation=mlp_activation)
        self.ada = AdaLN(dim, dim, chunks=6)

    def forward(
        self, x: torch.Tensor, others: torch.Tensor, others_mask: torch.Tensor, c: torch.Tensor
    ) -> torch.Tensor:
        """x (B, T_i, D) queries (every token is independent of the others, so a caller may pass a slice)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)
        h = self.cross(modulate(self.norm1(x), shift1, scale1), context=others, key_mask=others_mask)
        x = x + gate1.unsqueeze(1) * h
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x  # (B, T_i, D)


class CollaborativeRefiner(nn.Module):
    """Fuses K >= 2 refined branches: each branch queries the concatenation of all the others."""

    def __init__(
        self,
        num_branches: int,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        mlp_activation: MLPActivation = "gelu_tanh",
    ) -> None:
        super().__init__()
        if num_branches < 2:
            raise ValueError("the collaborative refiner needs at least two LLM branches")
        self.blocks = nn.ModuleList(
            CollaborativeBlock(dim, heads, mlp_ratio, mlp_activation) for _ in range(num_branches)
        )

    def forward(
        self,
        branches: list[torch.Tensor],
        masks: list[torch.Tensor],
        c: torch.Tensor,
        keep_from: list[int] | None = None,
    ) -> list[torch.Tensor]:
        """All branches update from the same input snapshot, so branch order does not matter.

        `keep_from[i]`: return (and compute) branch i's tokens from that index on only; every token of
        the other branches stays a key (the prefix guided the LLM, the DiT reads only the prompt).
        """
        keep_from = keep_from or [0] * len(branches)
        out = []
        for i, block in enumerate(self.blocks):
            others = torch.cat([b for j, b in enumerate(branches) if j != i], dim=1)  # (B, S, D)
            others_mask = torch.cat([m for j, m in enumerate(masks) if j != i], dim=1)  # (B, S)
            out.append(block(branches[i][:, keep_from[i] :], others, others_mask, c))
        return out
