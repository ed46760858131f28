"""Data parallelism for the generator: FSDP2 or full replicas, chosen per run.

FSDP2: `fully_shard` each repeated block, then the root (torchtitan order). Replication: the composable
`replicate` (DDP's bucketed gradient all-reduce, overlapped with backward, on plain tensors). Optional
activation checkpointing and per-block `torch.compile` are applied to the blocks first, for both.

Why two: sharding pays when parameters, gradients and optimizer state do not fit comfortably per device, and
NCCL makes its all-gathers cheap. A few-million-parameter model on CPU cores over gloo is the opposite case:
FSDP2 all-gathers every block's weights twice a step, reduce-scatters its gradients and routes optimizer,
clipping and EMA through DTensor dispatch, while a replica needs one gradient all-reduce, overlapped with
backward (measured: benchmarks/results/train_strategies.md for the step alone, train_throughput.md for runs).

`lidit/` stays single-device; everything distributed lives here.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributed._composable import replicate
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lidit.generator import LiDiTGenerator

Strategy = Literal["fsdp", "replicate", "single"]

# `auto` replicates on CPU up to this size: full fp32 weights + grads + AdamW moments + EMA are 20 bytes per
# parameter per worker, 2 GB at 100M, which CPU hosts hold; past it, sharding's memory saving starts to matter.
REPLICATE_MAX_PARAMS_CPU = 100_000_000


def resolve_strategy(
    requested: str, device_type: str, world: int, num_params: int, bf16: bool = False
) -> Strategy:
    """The strategy a run uses: `requested` is the config's `scale.strategy` (auto, fsdp or replicate).

    `auto`: FSDP2 on GPU and for bf16 (its MixedPrecisionPolicy does the casting); on CPU, replicas for models
    up to `REPLICATE_MAX_PARAMS_CPU`. A replicated run of one worker needs no wrapper at all (`single`).
    """
    if requested == "auto":
        small_cpu = device_type == "cpu" and num_params <= REPLICATE_MAX_PARAMS_CPU
        requested = "replicate" if small_cpu and not bf16 else "fsdp"
    if requested == "replicate":
        if bf16:
            raise ValueError("bf16 mixed precision needs strategy fsdp")
        return "single" if world == 1 else "replicate"
    if requested == "fsdp":
        return "fsdp"
    raise ValueError(f"unknown strategy {requested!r}; choose auto, fsdp or replicate")


def repeated_blocks(model: LiDiTGenerator) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of every block FSDP shards on its own: refiner, collaborative and DiT blocks."""
    lists: list[nn.ModuleList] = [r.blocks for r in model.refiners]
    if model.collaborative is not None:
        lists.append(model.collaborative.blocks)
    lists.append(model.backbone.blocks)
    return [(container, i) for container in lists for i in range(len(container))]


def parallelize(
    model: LiDiTGenerator,
    mesh: DeviceMesh,
    bf16: bool = False,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    strategy: Strategy = "fsdp",
) -> LiDiTGenerator:
    """Wrap `model` in place for data parallelism over `mesh` (a resolved `strategy`); returns it for chaining.

    Every rank must hold the same initial weights (same seed): replication broadcasts rank 0's anyway, FSDP2
    keeps each rank's own shard of its own copy.
    """
    for container, i in repeated_blocks(model):
        block = container[i]
        if activation_checkpointing:
            block = checkpoint_wrapper(block)
        if compile_blocks:
            block = torch.compile(block)
        container[i] = block
    if strategy == "fsdp":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
        for container, i in repeated_blocks(model):
            fully_shard(container[i], **kwargs)
        fully_shard(model, **kwargs)
    elif strategy == "replicate":
        if bf16:
            raise ValueError("bf16 mixed precision needs strategy fsdp")
        replicate(model, device_mesh=mesh)
    elif strategy != "single":
        raise ValueError(f"unknown resolved strategy {strategy!r}")
    return model
