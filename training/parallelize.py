"""Data parallelism for the generator: FSDP2 or full replicas, chosen per run.

FSDP2: `fully_shard` each repeated block, then the root (torchtitan order). Replication: the composable
`replicate` (DDP's bucketed gradient all-reduce, overlapped with backward, on plain tensors). Optional
activation checkpointing and per-block `torch.compile` are applied to the blocks first, for both.

Why two: sharding pays when parameters, gradients and optimizer state do not fit comfortably per device, and
NCCL makes its all-gathers cheap. A few-million-parameter model on CPU cores over gloo is the opposite case:
FSDP2 all-gathers every block's weights twice a step, reduce-scatters its gradients and routes optimizer,
clipping and EMA through DTensor dispatch, while a replica needs one gradient all-reduce, overlapped with
backward (measured: benchmarks/results/train_strategies.md for the step alone, train_throughput.md for runs).

Construction (torchtitan's order): `build_on_meta` (no storage), `parallelize`, `to_empty`, `init_weights`.
No rank ever holds more than its shards plus one block's full weights on the CPU, while they are initialised.

`lidit/` stays single-device; everything distributed lives here.
"""

from __future__ import annotations

import hashlib
from itertools import chain
from typing import Literal

import torch
from torch import nn
from torch.distributed._composable import replicate
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from lidit.generator import GeneratorConfig, LiDiTGenerator
from training.config import ScaleSection
from training.state import clean_name

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
    mesh: DeviceMesh | None,
    bf16: bool = False,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    strategy: Strategy = "fsdp",
    reshard_after_forward: bool = True,
) -> LiDiTGenerator:
    """Wrap `model` in place for data parallelism over `mesh` (a resolved `strategy`); returns it for chaining.

    Every rank must hold the same initial weights (same seed): replication broadcasts rank 0's anyway, FSDP2
    keeps each rank's own shard of its own copy. `single` (one worker, no wrapper) needs no `mesh`.
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
            fully_shard(container[i], reshard_after_forward=reshard_after_forward, **kwargs)
        fully_shard(model, **kwargs)  # FSDP2 never reshards the root after forward (backward needs it next)
    elif strategy == "replicate":
        if bf16:
            raise ValueError("bf16 mixed precision needs strategy fsdp")
        replicate(model, device_mesh=mesh)
    elif strategy != "single":
        raise ValueError(f"unknown resolved strategy {strategy!r}")
    return model


def wrap_single_worker(model: LiDiTGenerator, scale: ScaleSection) -> LiDiTGenerator:
    """The loop's per-block wrapping (`scale.compile`, `scale.activation_checkpointing`) of one worker with no
    data parallelism: what the Ray-free benchmarks apply, so they time the step the loop runs."""
    return parallelize(
        model,
        None,
        activation_checkpointing=scale.activation_checkpointing,
        compile_blocks=scale.compile,
        strategy="single",
    )


def build_parallel(
    config: GeneratorConfig,
    mesh: DeviceMesh,
    device: torch.device,
    seed: int,
    strategy: Strategy,
    bf16: bool = False,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    reshard_after_forward: bool = True,
) -> LiDiTGenerator:
    """Meta build -> `parallelize` -> `to_empty(device)` -> `init_weights`: the full model never exists on a rank.

    FSDP2 shards the meta model first, so `to_empty` allocates this rank's shards only. Replicas need real
    weights to wrap (the composable `replicate` broadcasts rank 0's), so they are materialised first; every rank
    initialises the same weights either way.
    """
    model = build_on_meta(config)
    if strategy == "fsdp":
        parallelize(
            model, mesh, bf16, activation_checkpointing, compile_blocks, strategy, reshard_after_forward
        )
        model.to_empty(device=device)
        return init_weights(model, config, seed)
    model.to_empty(device=device)
    init_weights(model, config, seed)
    return parallelize(model, mesh, bf16, activation_checkpointing, compile_blocks, strategy)


def build_on_meta(config: GeneratorConfig) -> LiDiTGenerator:
    """The generator with every parameter on the meta device: shapes only, no storage, no random draws."""
    with torch.device("meta"):
        return LiDiTGenerator(config)


def _unit_seed(seed: int, unit: str) -> int:
    # Not hash(): str hashes are salted per process, and every rank (and every restart) must agree.
    return int.from_bytes(hashlib.sha256(f"{seed}/{unit}".encode()).digest()[:8], "little") % (2**63)


@torch.no_grad()
def init_weights(model: nn.Module, config: GeneratorConfig, seed: int) -> nn.Module:
    """Initialise `model` (a `LiDiTGenerator` after `to_empty`: plain, wrapped or FSDP2-sharded) in place.

    The rule is the generator's own: each module's `reset_parameters` (what an eager constructor draws), then
    `LiDiTGenerator.initialize_weights` (Xavier, adaLN-Zero). It runs unit by unit on a CPU twin built on the
    meta device: each repeated block (the FSDP units) and then everything outside the blocks is materialised on
    the CPU alone, drawn from a generator seeded by (`seed`, the unit's name), initialised, copied into this
    rank's shard (`distribute_tensor(..., src_data_rank=None)`: every rank computes the same full unit, so
    no communication), and dropped. So:

    - every rank, strategy and world size gets the same weights (a function of `seed` and the config only);
    - an eager model given the same call (`init_weights(LiDiTGenerator(config), config, seed)`) is bit-equal;
    - it is *not* the stream of `torch.manual_seed(seed); LiDiTGenerator(config)`, whose draws depend on the
      order of every module before; same distributions and zeros, other numbers (tests/training/test_meta_init.py);
    - peak extra memory is one block's full fp32 weights (what FSDP all-gathers for a step anyway).
    The global RNG is left as it was.
    """
    twin = build_on_meta(config)
    targets = {clean_name(n): t for n, t in chain(model.named_parameters(), model.named_buffers())}
    done: set[str] = set()
    names = {id(m): n for n, m in twin.named_modules()}
    blocks = [(f"{names[id(c)]}.{i}", c[i]) for c, i in repeated_blocks(twin)]
    inside = {f"{p}.{n}" if n else p for p, b in blocks for n, _ in b.named_modules()}
    rest = [(n, m) for n, m in twin.named_modules() if n not in inside]
    units = [(p, [(f"{p}.{n}" if n else p, m) for n, m in b.named_modules()]) for p, b in blocks]
    units.append(("<root>", rest))
    for unit, modules in units:
        for _, module in modules:
            module.to_empty(device="cpu", recurse=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_unit_seed(seed, unit))
            for _, module in modules:
                if (
                    hasattr(module, "reset_parameters")
                    and next(chain(module.parameters(recurse=False), module.buffers(recurse=False)), None)
                    is not None
                ):
                    module.reset_parameters()
            LiDiTGenerator.initialize_weights(twin)  # real only for this unit; meta elsewhere (no-ops)
        for prefix, module in modules:
            for name, full in chain(
                module.named_parameters(recurse=False), module.named_buffers(recurse=False)
            ):
                key = f"{prefix}.{name}" if prefix else name
                _copy_into(targets[key], full)
                done.add(key)
            module.to_empty(device="meta", recurse=False)
    missed = sorted(set(targets) - done)
    if missed:
        raise RuntimeError(f"init_weights left {missed} uninitialised")
    return model


def _copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Write a full CPU tensor into a plain tensor or into this rank's shard of a DTensor."""
    if isinstance(target, DTensor):
        shard = distribute_tensor(
            full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None
        ).to_local()
        target.to_local().copy_(shard)
    else:
        target.copy_(full)
