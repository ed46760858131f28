"""GPU check: FSDP2 over NCCL with bf16 mixed precision on the LI-DiT generator; step throughput and MFU.

Ray-free on purpose: it applies `training.parallelize` (exactly the sharding a Ray Train worker applies) to the
`lidit` generator, on synthetic features shaped like the paper's setup: two 4096-wide LLMs (LLaMA3-8B,
Qwen1.5-7B states), 128 tokens each incl. prefix, 512 px images (64x64x4 latents, 1024 image tokens).

    python benchmarks/gpu_fsdp.py --presets S B LI-DiT-1B --out benchmarks/results      # one GPU
    torchrun --nproc-per-node 8 benchmarks/gpu_fsdp.py ...                               # a node

What it checks and writes (`gpu_fsdp.md` + `.json`): the bf16 FSDP loss of the first batch matches an fp32
unsharded copy of the same weights (relative tolerance), the loss falls over the timed steps on a fixed batch,
and per preset: step time, samples/s, model FLOPs per step (counted by `FlopCounterMode`, not estimated), achieved
TFLOP/s per GPU, MFU against `--peak-tflops`, peak memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lidit.generator import GeneratorConfig, LiDiTGenerator, TextBranchSpec, TextFeatures  # noqa: E402
from training.parallelize import parallelize  # noqa: E402


def make_batch(cfg: argparse.Namespace, batch: int, device: torch.device, encoders: int) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(0)
    lat = torch.randn(batch, 4, cfg.latent, cfg.latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    target = torch.randn(lat.shape, generator=g)
    texts = []
    for _ in range(encoders):
        states = torch.randn(batch, cfg.text_tokens, cfg.llm_width, generator=g)
        mask = torch.ones(batch, cfg.text_tokens, dtype=torch.bool)
        mask[: batch // 2, cfg.text_tokens * 3 // 4 :] = False  # ragged prompts, as in real batches
        texts.append(TextFeatures(states.to(device), mask.to(device), cfg.prefix_tokens))
    return lat.to(device), t.to(device), target.to(device), texts


def count_flops(gen_cfg: GeneratorConfig, cfg: argparse.Namespace, batch: int) -> int:
    """Forward + backward FLOPs of one step, counted on the meta device (no memory, exact matmul counts)."""
    with torch.device("meta"):
        model = LiDiTGenerator(gen_cfg)
        lat, t, target, texts = make_batch(cfg, batch, torch.device("meta"), len(gen_cfg.encoders))
    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(model(lat, t, texts), target).backward()
    return counter.get_total_flops()


def bench_preset(
    name: str, mode: str, cfg: argparse.Namespace, mesh, device: torch.device, rank: int
) -> dict:
    branches = [TextBranchSpec(name=f"llm{i}", hidden_size=cfg.llm_width) for i in range(cfg.encoders)]
    gen_cfg = GeneratorConfig.from_preset(name, branches)
    batch = cfg.batch.get(name, 16)
    torch.manual_seed(0)
    model = LiDiTGenerator(gen_cfg)
    with torch.no_grad():  # adaLN-Zero makes the output exactly 0 at init: give those layers weights so the
        for p in model.parameters():  # parity check and the step compare real numbers
            if not p.any():
                p.normal_(std=0.02)
    model = model.to(device)
    params = sum(p.numel() for p in model.parameters())
    reference = copy.deepcopy(model) if name == cfg.parity_preset and mode == "plain" else None
    parallelize(
        model, mesh, bf16=True, activation_checkpointing="ac" in mode, compile_blocks="compile" in mode
    )
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lat, t, target, texts = make_batch(cfg, batch, device, cfg.encoders)
    parity = None
    if reference is not None:
        with torch.no_grad():
            ref = F.mse_loss(reference(lat, t, texts).float(), target).item()
            got = F.mse_loss(model(lat, t, texts).float(), target).item()
        parity = {"fp32_loss": ref, "bf16_fsdp_loss": got, "rel_diff": abs(got - ref) / abs(ref)}
        del reference
    torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for step in range(cfg.warmup + cfg.steps):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = F.mse_loss(model(lat, t, texts).float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        if step >= cfg.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    world = dist.get_world_size()
    step_s = sorted(times)[len(times) // 2]  # median: robust to one slow step
    flops = count_flops(gen_cfg, cfg, batch)
    tflops = flops / step_s / 1e12
    row = {
        "preset": name,
        "params_M": round(params / 1e6, 1),
        "batch_per_gpu": batch,
        "gpus": world,
        "mode": mode,
        "step_ms": round(step_s * 1e3, 2),
        "samples_per_s": round(batch * world / step_s, 1),
        "gflops_per_step": round(flops / 1e9, 1),
        "tflops_per_gpu": round(tflops, 1),
        "mfu": round(tflops / cfg.peak_tflops, 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "loss_falls": losses[-1] < losses[0],
        "parity": parity,
    }
    if rank == 0:
        print(json.dumps(row), flush=True)
    del model, optim
    torch.cuda.empty_cache()
    return row


def write_results(rows: list[dict], cfg: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python " + " ".join(sys.argv),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "peak_tflops": cfg.peak_tflops,
        "shapes": {
            "encoders": cfg.encoders,
            "llm_width": cfg.llm_width,
            "text_tokens": cfg.text_tokens,
            "latent": f"4x{cfg.latent}x{cfg.latent}",
        },
    }
    (out / "gpu_fsdp.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# FSDP2 + NCCL + bf16 on GPU (generator train step)",
        "",
        f"Command: `{meta['command']}`  ",
        f"GPU: {meta['gpu']} x {rows[0]['gpus']}, torch {meta['torch']}, NCCL {meta['nccl']}. Inputs: "
        f"{cfg.encoders} LLMs x {cfg.llm_width} wide x {cfg.text_tokens} tokens, latents {meta['shapes']['latent']} "
        f"(512 px). FLOPs counted with FlopCounterMode; MFU against {cfg.peak_tflops} TFLOP/s dense bf16.",
        "",
        "| preset | mode | params | batch/GPU | step ms | samples/s | GFLOP/step | TFLOP/s/GPU | MFU | peak GiB | loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['mode']} | {r['params_M']}M | {r['batch_per_gpu']} | {r['step_ms']} | {r['samples_per_s']} | "
            f"{r['gflops_per_step']} | {r['tflops_per_gpu']} | {r['mfu']:.1%} | {r['peak_mem_gib']} | "
            f"{r['loss_first']} -> {r['loss_last']} |"
        )
    for r in rows:
        if r["parity"]:
            p = r["parity"]
            lines += [
                "",
                f"bf16 FSDP vs fp32 unsharded, same weights and batch ({r['preset']}): loss {p['bf16_fsdp_loss']:.5f} "
                f"vs {p['fp32_loss']:.5f}, relative difference {p['rel_diff']:.2e}.",
            ]
    (out / "gpu_fsdp.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["S", "B", "LI-DiT-1B"])
    parser.add_argument(
        "--batch", type=json.loads, default={"S": 64, "B": 64, "LI-DiT-1B": 32, "LI-DiT-10B": 4}
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--encoders", type=int, default=2)
    parser.add_argument("--llm-width", type=int, default=4096)
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--prefix-tokens", type=int, default=32)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["plain"],
        help="plain, compile (per-block), ac (activation ckpt), compile+ac",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200 SXM)"
    )
    parser.add_argument("--parity-preset", default="S")
    parser.add_argument("--out", default="benchmarks/results")
    cfg = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_fsdp: no CUDA device; this benchmark checks FSDP2 + NCCL + bf16 on GPUs", file=sys.stderr)
        return 2
    for key, default in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29511"),
    ):
        os.environ.setdefault(key, default)
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    rows = [bench_preset(name, mode, cfg, mesh, device, rank) for mode in cfg.modes for name in cfg.presets]
    if rank == 0:
        write_results(rows, cfg, Path(cfg.out))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
