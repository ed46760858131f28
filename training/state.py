"""Training state that FSDP2 + DCP can checkpoint: EMA weights kept as sharded tensors beside the model,
the learning-rate schedule as a pure function of the step, and full-weight export for serving."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from training.config import OptimSection

# Wrappers add these to parameter names; exported weights use the plain module names.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def lr_at(step: int, total: int, cfg: OptimSection) -> float:
    """Linear warmup then cosine decay to `min_lr_ratio * lr`; a pure function so resume needs no state."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's storage of a parameter: the local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    """Exponential moving average of the parameters, stored like the model: shard-for-shard DTensors under
    FSDP2 (so DCP checkpoints them sharded), plain tensors under replication."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One multi-tensor lerp over the local shards.

        EMA is elementwise, so shards need no communication. A `lerp_` per parameter (~200 of them) went
        through DTensor dispatch each time under FSDP2: on the 2M-parameter starter model that cost more than
        the arithmetic (benchmarks/results/train_strategies.md, `+loop_ema`).
        """
        named = list(model.named_parameters())
        shadows = [local(self.shadow[n]) for n, _ in named]
        params = [local(p.detach()) for _, p in named]
        torch._foreach_lerp_(shadows, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def full_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """Full fp32 CPU tensors with clean names, for export; a collective under FSDP2: every rank calls it.

        With `rank0_only` (the default) only rank 0 keeps them and the other ranks get `{}`: one parameter
        is gathered at a time and dropped at once everywhere else, so no other rank ever holds more than one
        full parameter (the EMA counterpart of `get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))`, which also keeps the result on rank 0 only). Replicas
        already hold full tensors; the other ranks skip the copy. Outside a process group, rank 0.
        """
        keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
        out = {}
        for name, t in self.shadow.items():
            full = t.full_tensor() if isinstance(t, DTensor) else t  # all-gather of one parameter
            if keep:
                out[clean_name(name)] = full.detach().to("cpu", torch.float32, copy=True)
            del full
        return out


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gathered plain parameters + buffers with clean names (collective)."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        full = t.full_tensor() if isinstance(t, DTensor) else t
        out[clean_name(name)] = full.detach().float().cpu()
    return out
