"""FSDP2 for the generator: `fully_shard` each repeated block, then the root (torchtitan order), with
optional activation checkpointing and per-block `torch.compile` applied before sharding.

`lidit/` stays single-device; everything distributed lives here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lidit.generator import LiDiTGenerator


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
) -> LiDiTGenerator:
    """Shard `model` in place over `mesh`; returns it for chaining."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    for container, i in repeated_blocks(model):
        block = container[i]
        if activation_checkpointing:
            block = checkpoint_wrapper(block)
        if compile_blocks:
            block = torch.compile(block)
        container[i] = block
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
