"""The trainable generator: one linguistic token refiner per LLM, the collaborative refiner (2+ LLMs),
prefix dropping and concatenation, and the LI-DiT backbone.

Saved like a diffusers model: a directory with `config.json` (the constructor config) and
`model.safetensors`. Runtime objects never go into the config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from lidit.config import StrictModel
from lidit.dit import LiDiT
from lidit.layers import MLPActivation, masked_mean
from lidit.presets import get_preset
from lidit.refiner import CollaborativeRefiner, LinguisticTokenRefiner

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class TextBranchSpec(StrictModel):
    """What the generator needs to know about one LLM branch: its name and hidden width."""

    name: str = Field(min_length=1)
    hidden_size: int = Field(gt=0)


class GeneratorConfig(StrictModel):
    """Constructor config of `LiDiTGenerator` (serialised as config.json)."""

    encoders: list[TextBranchSpec] = Field(min_length=1)
    dim: int = Field(96, gt=0)
    depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    refiner_depth: int = Field(2, ge=0, description="0 = raw LLM states (projection only)")
    refiner_causal: bool = Field(False, description="causal-mask refiner ablation")
    refiner_position: bool = Field(
        False, description="sin-cos token-index embedding in the refiners' attention (not in the paper)"
    )
    fusion: Literal["collaborative", "concat"] = "collaborative"
    mlp_ratio: float = Field(4.0, gt=0)
    patch_size: int = Field(2, ge=1)
    latent_channels: int = Field(4, ge=1)
    qk_norm: bool = True
    sincos_position: bool = Field(True, description="add a 2D sin-cos grid embedding before the conv block")
    timestep_channels: int = Field(256, ge=2)
    conv_channels: int = Field(
        0,
        ge=0,
        description="channels of a conv stem and head at latent resolution around the DiT (0: off; not in "
        "the paper): the head draws shapes across patch borders, the stem's features skip to it",
    )
    mlp_conv: bool = Field(
        False,
        description="depthwise 3x3 conv over the token grid inside every block's MLP (SANA's Mix-FFN; not in "
        "the paper): locality in every block",
    )
    mlp_activation: MLPActivation = Field(
        "gelu_tanh",
        description="every MLP's activation: gelu_tanh (DiT's tanh approximation) or gelu (exact, erf): the same "
        "curve within 1e-3, at half the CPU time (torch's CPU tanh is the slow part)",
    )
    layout_head: bool = Field(
        False,
        description="head reading each fused prompt token's object position (text-side layout supervision, not "
        "in the paper): trained by the layout loss, used at sampling only through layout_attention",
    )
    layout_attention: bool = Field(
        False,
        description="bias the DiT's cross-attention by the layout head's per-token offsets (needs layout_head)",
    )

    @model_validator(mode="after")
    def _check(self) -> GeneratorConfig:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if self.layout_attention and not self.layout_head:
            raise ValueError("layout_attention reads the layout head: set layout_head=True too")
        names = [e.name for e in self.encoders]
        if len(set(names)) != len(names):
            raise ValueError(f"encoder names must be unique, got {names}")
        return self

    @classmethod
    def from_preset(cls, preset: str, encoders: list[TextBranchSpec], **overrides: object) -> GeneratorConfig:
        """Sizes from a named preset (see `lidit.presets`), anything else from `overrides`."""
        p = get_preset(preset)
        fields = dict(
            dim=p.dim,
            depth=p.depth,
            heads=p.heads,
            refiner_depth=p.refiner_depth,
            mlp_ratio=p.mlp_ratio,
            patch_size=p.patch_size,
        )
        fields.update(overrides)
        return cls(encoders=encoders, **fields)


@dataclass
class TextFeatures:
    """One LLM's tokens for a batch: prefix (system prompt + instruction) then prompt tokens.

    states (B, T, Dllm); mask (B, T) bool, True = real token; the first `prefix_len` tokens are the prefix.
    """

    states: torch.Tensor
    mask: torch.Tensor
    prefix_len: int

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextFeatures:
        return TextFeatures(self.states.to(device, dtype), self.mask.to(device), self.prefix_len)

    def drop_prompt(self, drop: torch.Tensor) -> TextFeatures:
        """Mask out the prompt tokens of rows where `drop` (B,) is True: the encoding of the empty prompt,
        exactly, because a causal LLM's prefix states do not depend on what follows (CFG dropout)."""
        mask = self.mask.clone()
        mask[:, self.prefix_len :] &= ~drop.to(mask.device).unsqueeze(1)
        return TextFeatures(self.states, mask, self.prefix_len)

    def padded_to(self, length: int) -> TextFeatures:
        """The token axis padded with masked-out zero tokens up to `length` (itself when it has that many).
        Masked tokens change no output (tests/lidit/test_generator.py), only the shape."""
        extra = length - self.states.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad {self.states.shape[1]} tokens to {length}")
        if not extra:
            return self
        states = nn.functional.pad(self.states, (0, 0, 0, extra))
        return TextFeatures(states, nn.functional.pad(self.mask, (0, extra)), self.prefix_len)

    def padded_to_multiple(self, multiple: int) -> TextFeatures:
        """The token axis padded (`padded_to`) up to a multiple of `multiple`."""
        return self.padded_to(self.states.shape[1] + -self.states.shape[1] % multiple)

    @staticmethod
    def cat(items: list[TextFeatures]) -> TextFeatures:
        """Stack batches along B (same prefix); pads the token axis to the longest."""
        if len({i.prefix_len for i in items}) != 1:
            raise ValueError("cannot concatenate features with different prefixes")
        longest = max(i.states.shape[1] for i in items)
        padded = [i.padded_to(longest) for i in items]
        states, masks = torch.cat([i.states for i in padded]), torch.cat([i.mask for i in padded])
        return TextFeatures(states, masks, items[0].prefix_len)


class HardNegatives(NamedTuple):
    """Negative captions for some rows of a batch: `rows` (K,) indices into the batch, and `texts` one
    `TextFeatures` (K rows, in the order of `rows`) per generator branch, like the batch's own texts."""

    rows: torch.Tensor
    texts: list[TextFeatures]


class LiDiTGenerator(nn.Module):
    """Refiners + collaborative refiner + LI-DiT: predicts epsilon or velocity for noisy latents."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.time_proj = Timesteps(config.timestep_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(config.timestep_channels, d)
        self.refiners = nn.ModuleList(
            LinguisticTokenRefiner(
                e.hidden_size,
                d,
                config.refiner_depth,
                config.heads,
                config.mlp_ratio,
                causal=config.refiner_causal,
                position=config.refiner_position,
                mlp_activation=config.mlp_activation,
            )
            for e in config.encoders
        )
        self.collaborative = (
            CollaborativeRefiner(
                len(config.encoders), d, config.heads, config.mlp_ratio, config.mlp_activation
            )
            if len(config.encoders) > 1 and config.fusion == "collaborative"
            else None
        )
        # A learned token always present in the fused sequence, so cross-attention has a key to attend to
        # even for an empty prompt with no prefix (the unconditional branch of CFG).
        self.null_token = nn.Parameter(torch.zeros(1, 1, d))
        self.text_pool = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        # Per token, not pooled: each object's words must carry where that object goes.
        self.layout_head = (
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2))
            if config.layout_head
            else None
        )
        self.backbone = LiDiT(
            config.latent_channels,
            config.patch_size,
            d,
            config.depth,
            config.heads,
            config.mlp_ratio,
            config.qk_norm,
            config.sincos_position,
            config.layout_attention,
            config.conv_channels,
            config.mlp_conv,
            config.mlp_activation,
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier for linear layers, then re-zero every adaLN / gate / output layer (adaLN-Zero) and the layout
        attention scales. Every parameter is set here or by its module's `reset_parameters`: a model
        materialised from the meta device (`training.parallelize.init_weights`) has nothing else."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.null_token, std=0.02)
        for module in self.modules():  # layout attention starts off: the DiT as without it
            if getattr(module, "layout_scale", None) is not None:
                nn.init.zeros_(module.layout_scale)
        for module in self.modules():
            if hasattr(module, "reset_parameters") and module.__class__.__name__ == "AdaLN":
                module.reset_parameters()
        nn.init.zeros_(self.backbone.final.linear.weight)
        nn.init.zeros_(self.backbone.final.linear.bias)
        if self.backbone.conv_channels:  # the prediction starts at zero, as without the head
            nn.init.zeros_(self.backbone.head_out.weight)
            nn.init.zeros_(self.backbone.head_out.bias)

    def encode_text(
        self, texts: list[TextFeatures], t_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refine each branch, fuse, drop prefixes, concatenate: -> tokens (B, S, D), mask (B, S)."""
        if len(texts) != len(self.refiners):
            raise ValueError(f"expected text features for {len(self.refiners)} encoders, got {len(texts)}")
        # The prefix (system prompt + instruction) guided the LLM; only prompt tokens reach the DiT, so the
        # last text layer computes only those (the collaborative refiner's keys keep every token).
        prefix_lens = [f.prefix_len for f in texts]
        fuse = self.collaborative is not None
        branches, masks, conds = [], [], []
        for refiner, feats in zip(self.refiners, texts, strict=True):
            mask = feats.mask.bool()
            c = refiner.condition(feats.states, mask, t_emb)  # (B, D), also feeds the collaborative refiner
            keep_from = 0 if fuse else feats.prefix_len
            branches.append(refiner(feats.states, mask, t_emb, c, keep_from))  # (B, T_i - keep_from, D)
            masks.append(mask)
            conds.append(c)
        if fuse:
            tokens = self.collaborative(branches, masks, torch.stack(conds).mean(0), prefix_lens)
        else:
            tokens = branches
        token_masks = [m[:, n:] for m, n in zip(masks, prefix_lens, strict=True)]
        prompt_tokens = torch.cat(tokens, dim=1)  # (B, S-1, D)
        prompt_mask = torch.cat(token_masks, dim=1)  # (B, S-1)
        b = prompt_tokens.shape[0]
        fused = torch.cat([prompt_tokens, self.null_token.expand(b, -1, -1).to(prompt_tokens.dtype)], dim=1)
        fused_mask = torch.cat([prompt_mask, prompt_mask.new_ones(b, 1)], dim=1)
        return fused, fused_mask  # (B, S, D), (B, S)

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        texts: list[TextFeatures],
        with_layout: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """latents (B, C, H, W), timesteps (B,) in [0, 1000), texts one per encoder -> prediction (B, C, H, W).

        `with_layout` (needs `layout_head`) also returns the head's (B, S-1, 2) reading of every fused prompt
        token (the branches' prompt tokens in order, padded as in `encode_text`; no null token). It runs inside
        forward so a sharded model unshards the head with everything else."""
        t_emb = self.time_embed(self.time_proj(timesteps).to(latents.dtype))  # (B, D)
        tokens, mask = self.encode_text(texts, t_emb)
        pooled = masked_mean(tokens[:, :-1], mask[:, :-1])  # (B, D), prompt tokens only
        c = t_emb + self.text_pool(pooled)  # (B, D)
        if with_layout and self.layout_head is None:
            raise ValueError("with_layout needs a generator built with layout_head=True")
        layout = self.layout_head(tokens[:, :-1]) if with_layout or self.config.layout_attention else None
        text_layout = None
        if self.config.layout_attention:
            # Detached: the layout loss alone trains the head, the DiT only learns how far to lean on it.
            text_layout = torch.cat([layout.detach(), layout.new_zeros(layout.shape[0], 1, 2)], dim=1)
        pred = self.backbone(latents, c, tokens, mask, text_layout)
        return (pred, layout) if with_layout else pred

    # -- persistence -------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` + `model.safetensors` (weights made contiguous, on CPU)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.model_dump(mode="json"), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> LiDiTGenerator:
        """Load a directory written by `save_pretrained` (safetensors only: no pickle)."""
        directory = Path(directory)
        config_file = directory / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{directory} is not a LI-DiT generator directory (no {CONFIG_NAME})")
        config = GeneratorConfig.model_validate_json(config_file.read_text())
        model = cls(config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME), device=str(device)), strict=True)
        return model.to(device)


def count_parameters(config: GeneratorConfig) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        model = LiDiTGenerator(config)
    return sum(p.numel() for p in model.parameters())
