"""GPU check: the platform's train step (FSDP2 over NCCL, bf16 mixed precision) on the LI-DiT generator;
step throughput and MFU, one row per set of levers.

Ray-free on purpose, and no copy of the step: each run builds the generator exactly as a Ray Train worker does
(`training.parallelize.build_parallel`: meta device, FSDP2 sharding, `to_empty`, seeded init), and times
`training.step.train_step` (CFG dropout, noising, LR schedule, forward, MSE, backward, clip, AdamW from
`build_optimizer`, EMA) on synthetic features shaped like the paper's setup: two 4096-wide LLMs (LLaMA3-8B,
Qwen1.5-7B states), 128 tokens each incl. a 32-token prefix, 512 px images (64x64x4 latents, 1024 image tokens).
Text features are handed to the step on the GPU (what a prefetching loader delivers), latents on the CPU (the
step draws its noise there, from the (seed, rank, step) generator).

    python benchmarks/gpu_fsdp.py --runs LI-DiT-1B:b32 LI-DiT-1B:b64:compile:fused --out benchmarks/results
    torchrun --nproc-per-node 8 benchmarks/gpu_fsdp.py ...                                     # a node

A run is `PRESET[:bN][:compile][:ac][:fused|:foreach][:keep]`: batch per GPU, per-block `torch.compile`
(`scale.compile`), activation checkpointing (`scale.activation_checkpointing`), the AdamW kernels
(`optim.implementation`, default auto = fused) and `keep` = `scale.reshard_after_forward: false`.

What it writes (`gpu_fsdp.md` + `.json`, rewritten after every run so a cut-off job keeps what finished): per run,
step time (CUDA events around each step, no host sync inside the timed window, median), samples/s, model FLOPs
per step (counted by `FlopCounterMode` on the meta device: forward + backward of the generator, no recompute),
achieved TFLOP/s per GPU, MFU against `--peak-tflops`, peak memory, loss first -> last; and once, the bf16 FSDP
loss of one batch against an fp32 unsharded copy of the same weights. `--profile N` adds the CUDA kernel time
of run N by kind (`gpu_profile.md`).
"""

from __future__ import annotations

import argparse
import copy
import gc
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

from lidit.generator import (  # noqa: E402
    GeneratorConfig,
    LiDiTGenerator,
    TextBranchSpec,
    TextFeatures,
    count_parameters,
)
from training.config import TrainConfig  # noqa: E402
from training.parallelize import build_parallel, init_weights, parallelize  # noqa: E402
from training.state import EMA  # noqa: E402
from training.step import build_optimizer, step_generator, train_step  # noqa: E402

DEFAULT_BATCH = {"tiny": 64, "S": 64, "B": 64, "LI-DiT-1B": 32, "LI-DiT-10B": 4}


def parse_run(spec: str) -> dict:
    """`PRESET[:bN][:compile][:ac][:fused|:foreach][:keep]` -> the levers of one run."""
    preset, *flags = spec.split(":")
    run = {"spec": spec, "preset": preset, "batch": DEFAULT_BATCH.get(preset, 16), "compile": False}
    run.update(ac=False, optimizer="auto", reshard_after_forward=True)
    for flag in flags:
        if flag.startswith("b") and flag[1:].isdigit():
            run["batch"] = int(flag[1:])
        elif flag in ("compile", "ac"):
            run[flag] = True
        elif flag in ("fused", "foreach"):
            run["optimizer"] = flag
        elif flag == "keep":
            run["reshard_after_forward"] = False
        else:
            raise SystemExit(f"gpu_fsdp: unknown flag {flag!r} in run {spec!r}")
    return run


def generator_config(preset: str, cfg: argparse.Namespace) -> GeneratorConfig:
    branches = [TextBranchSpec(name=f"llm{i}", hidden_size=cfg.llm_width) for i in range(cfg.encoders)]
    return GeneratorConfig.from_preset(preset, branches)


def text_features(cfg: argparse.Namespace, batch: int, device: torch.device, seed: int = 0) -> list:
    g = torch.Generator(device="cpu").manual_seed(seed)
    texts = []
    for _ in range(cfg.encoders):
        states = torch.randn(batch, cfg.text_tokens, cfg.llm_width, generator=g)
        mask = torch.ones(batch, cfg.text_tokens, dtype=torch.bool)
        mask[: batch // 2, cfg.text_tokens * 3 // 4 :] = False  # ragged prompts, as in real batches
        texts.append(TextFeatures(states.to(device), mask.to(device), cfg.prefix_tokens))
    return texts


def latents(cfg: argparse.Namespace, batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, cfg.latent, cfg.latent, generator=torch.Generator().manual_seed(seed))


def count_flops(gen_cfg: GeneratorConfig, cfg: argparse.Namespace, batch: int) -> int:
    """Forward + backward FLOPs of the generator on one batch, counted on the meta device (exact matmul and
    attention counts, no memory). The step's optimizer, clipping and EMA are elementwise: not model FLOPs."""
    meta = torch.device("meta")
    with meta:
        model = LiDiTGenerator(gen_cfg)
    lat = torch.empty(batch, 4, cfg.latent, cfg.latent, device=meta)
    t = torch.empty(batch, device=meta)
    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(model(lat, t, text_features(cfg, batch, meta)), lat).backward()
    return counter.get_total_flops()


def train_config(run: dict, cfg: argparse.Namespace) -> TrainConfig:
    """The TrainConfig a GPU job would carry for these levers (the step reads its objective, CFG dropout,
    LR schedule, clipping, AdamW kernels and EMA decay from it)."""
    return TrainConfig.model_validate(
        {
            "batch_size": run["batch"],
            "steps": 1000,
            "model": {"preset": run["preset"], "objective": "flow"},
            "optim": {"lr": 1e-4, "warmup_steps": 0, "implementation": run["optimizer"]},
            "scale": {
                "use_gpu": True,
                "compile": run["compile"],
                "activation_checkpointing": run["ac"],
                "reshard_after_forward": run["reshard_after_forward"],
            },
        }
    )


def bench_run(run: dict, cfg: argparse.Namespace, mesh, device: torch.device, rank: int) -> dict:
    gen_cfg = generator_config(run["preset"], cfg)
    tcfg = train_config(run, cfg)
    batch = run["batch"]
    torch.cuda.reset_peak_memory_stats(device)
    built = time.perf_counter()
    model = build_parallel(
        gen_cfg,
        mesh,
        device,
        seed=0,
        strategy="fsdp",
        bf16=True,
        activation_checkpointing=tcfg.scale.activation_checkpointing,
        compile_blocks=tcfg.scale.compile,
        reshard_after_forward=tcfg.scale.reshard_after_forward,
    )
    build_s = time.perf_counter() - built
    init_peak = torch.cuda.max_memory_allocated(device)
    optim = build_optimizer(model, tcfg)
    ema = EMA(model, tcfg.optim.ema_decay)
    lat, texts = latents(cfg, batch), text_features(cfg, batch, device)

    def step(i: int) -> torch.Tensor:
        return train_step(model, optim, ema, lat, texts, tcfg, i, step_generator(0, rank, i), device).loss

    warm = time.perf_counter()
    losses = [step(i) for i in range(cfg.warmup)]  # compiles here when `compile` is on
    torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - warm
    torch.cuda.reset_peak_memory_stats(device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(cfg.steps + 1)]
    events[0].record()
    for i in range(cfg.steps):
        losses.append(step(cfg.warmup + i))
        events[i + 1].record()
    torch.cuda.synchronize(device)
    step_ms = sorted(events[i].elapsed_time(events[i + 1]) for i in range(cfg.steps))[cfg.steps // 2]
    flops = count_flops(gen_cfg, cfg, batch)
    tflops = flops / (step_ms / 1e3) / 1e12
    world = dist.get_world_size()
    if run.get("profile"):
        run["profile_table"] = profile_steps(step, cfg.warmup + cfg.steps, device)
    row = {
        "run": run["spec"],
        "preset": run["preset"],
        "params_M": round(count_parameters(gen_cfg) / 1e6, 1),
        "batch_per_gpu": batch,
        "gpus": world,
        "compile": run["compile"],
        "ac": run["ac"],
        "optimizer": "fused" if optim.defaults.get("fused") else "foreach",
        "reshard_after_forward": run["reshard_after_forward"],
        "build_s": round(build_s, 1),
        "warmup_s": round(warmup_s, 1),
        "step_ms": round(step_ms, 2),
        "samples_per_s": round(batch * world / (step_ms / 1e3), 1),
        "gflops_per_step": round(flops / 1e9, 1),
        "tflops_per_gpu": round(tflops, 1),
        "mfu": round(tflops / cfg.peak_tflops, 4),
        "init_peak_gib": round(init_peak / 2**30, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "loss_first": round(losses[0].item(), 4),
        "loss_last": round(losses[-1].item(), 4),
    }
    if rank == 0:
        print(json.dumps(row), flush=True)
    return row  # the model, optimizer and EMA go with this frame: `release` then frees their memory


def release() -> None:
    """Free what the last run left (its tensors, compiled graphs) before the next run builds its model."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.compiler.reset()


KERNEL_KINDS = (  # first match wins; names as CUDA reports them
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "lerp")),
    ("copy / cast", ("copy", "memcpy", "memset", "cat", "cast")),
    ("triton (fused elementwise)", ("triton",)),
    ("norm", ("layer_norm", "rms", "norm")),
)


def profile_steps(step, first: int, device: torch.device, steps: int = 3) -> list[dict]:
    """CUDA kernel time over `steps` steps, by kind, and the share of wall time the GPU was busy (on a CPU
    device, for a dry run of this code, the operators' CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(first + i)
        torch.cuda.synchronize(device)
    wall_us = (time.perf_counter() - started) * 1e6 / steps
    kinds: dict[str, float] = {}
    top = []
    for evt in prof.key_averages():
        us = (evt.self_device_time_total if cuda else evt.self_cpu_time_total) / steps
        if us <= 0:
            continue
        name = evt.key.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(s in name for s in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
        top.append((us, kind, evt.key[:90]))
    busy = sum(kinds.values())
    rows = [{"kind": "wall per step", "ms": round(wall_us / 1e3, 2), "share": 1.0}]
    rows.append({"kind": "GPU busy", "ms": round(busy / 1e3, 2), "share": round(busy / wall_us, 3)})
    rows += [
        {"kind": k, "ms": round(v / 1e3, 2), "share": round(v / wall_us, 3)}
        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
    ]
    rows += [
        {"kind": f"  top: {name} ({kind})", "ms": round(us / 1e3, 2), "share": round(us / wall_us, 3)}
        for us, kind, name in sorted(top, reverse=True)[:25]
    ]
    return rows


def parity(cfg: argparse.Namespace, mesh, device: torch.device, preset: str) -> dict:
    """bf16 FSDP loss vs an fp32 unsharded copy of the same weights on one batch (adaLN-Zero layers given
    weights first: at init their output is exactly 0 and would compare nothing)."""
    gen_cfg = generator_config(preset, cfg)
    reference = init_weights(LiDiTGenerator(gen_cfg), gen_cfg, seed=0)
    with torch.no_grad():
        for p in reference.parameters():
            if not p.any():
                p.normal_(std=0.02, generator=torch.Generator().manual_seed(p.numel()))
    reference = reference.to(device)
    model = parallelize(copy.deepcopy(reference), mesh, bf16=True)
    lat = latents(cfg, 8).to(device)
    t = torch.linspace(10, 990, 8, device=device)
    texts = text_features(cfg, 8, device)
    with torch.no_grad():
        ref = F.mse_loss(reference(lat, t, texts).float(), lat).item()
        got = F.mse_loss(model(lat, t, texts).float(), lat).item()
    del model, reference
    torch.cuda.empty_cache()
    return {"preset": preset, "fp32_loss": ref, "bf16_fsdp_loss": got, "rel_diff": abs(got - ref) / abs(ref)}


def write_results(rows: list[dict], check: dict | None, cfg: argparse.Namespace, out: Path) -> None:
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
    done = [r for r in rows if "step_ms" in r]
    gpus = done[0]["gpus"] if done else dist.get_world_size()
    (out / "gpu_fsdp.json").write_text(json.dumps({"meta": meta, "rows": rows, "parity": check}, indent=2))
    lines = [
        "# FSDP2 + NCCL + bf16 on GPU: the platform's train step",
        "",
        f"Command: `{meta['command']}`  ",
        f"GPU: {meta['gpu']} x {gpus}, torch {meta['torch']}, NCCL {meta['nccl']}. Inputs: "
        f"{cfg.encoders} LLMs x {cfg.llm_width} wide x {cfg.text_tokens} tokens, latents {meta['shapes']['latent']} "
        f"({cfg.latent * 8} px). Timed: `training.step.train_step` (forward, backward, clip, AdamW, EMA) on the model "
        f"`training.parallelize.build_parallel` makes. FLOPs: the generator's forward + backward, counted with "
        f"FlopCounterMode; MFU against {cfg.peak_tflops} TFLOP/s dense bf16.",
        "",
        "| run | params | batch/GPU | compile | act. ckpt | AdamW | reshard after fwd | step ms | samples/s "
        "| TFLOP/s/GPU | MFU | peak GiB | loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['run']} | {r['params_M']}M | {r['batch_per_gpu']} | {r['compile']} | {r['ac']} | "
            f"{r['optimizer']} | {r['reshard_after_forward']} | {r['step_ms']} | {r['samples_per_s']} | "
            f"{r['tflops_per_gpu']} | {r['mfu']:.1%} | {r['peak_mem_gib']} | {r['loss_first']} -> {r['loss_last']} |"
        )
    if check:
        lines += [
            "",
            f"bf16 FSDP vs fp32 unsharded, same weights and batch ({check['preset']}): loss "
            f"{check['bf16_fsdp_loss']:.5f} vs {check['fp32_loss']:.5f}, relative difference {check['rel_diff']:.2e}.",
        ]
    (out / "gpu_fsdp.md").write_text("\n".join(lines) + "\n")


def write_profile(run: dict, table: list[dict], out: Path) -> None:
    lines = [
        f"# CUDA kernel time per step: {run['spec']}",
        "",
        "| kind | ms | share of wall |",
        "|---|---|---|",
    ]
    lines += [f"| {r['kind']} | {r['ms']} | {r['share']:.1%} |" for r in table]
    (out / "gpu_profile.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", default=["LI-DiT-1B", "LI-DiT-1B:compile"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--encoders", type=int, default=2)
    parser.add_argument("--llm-width", type=int, default=4096)
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--prefix-tokens", type=int, default=32)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200 SXM)"
    )
    parser.add_argument("--parity-preset", default="S", help="'' skips the bf16 vs fp32 check")
    parser.add_argument("--profile", type=int, default=None, help="index of the run to profile")
    parser.add_argument("--out", default="benchmarks/results")
    cfg = parser.parse_args()
    runs = [parse_run(spec) for spec in cfg.runs]
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
    torch._dynamo.config.automatic_dynamic_shapes = False  # a new batch size recompiles static, not dynamic
    mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    out = Path(cfg.out)
    check = parity(cfg, mesh, device, cfg.parity_preset) if cfg.parity_preset else None
    rows: list[dict] = []
    for i, run in enumerate(runs):
        run["profile"] = i == cfg.profile
        try:
            rows.append(bench_run(run, cfg, mesh, device, rank))
        except Exception as exc:  # one failing lever must not cost the other rows; the reason is recorded
            if rank == 0:
                print(f"gpu_fsdp: run {run['spec']} failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"run": run["spec"], "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        release()
        if rank == 0:
            write_results(rows, check, cfg, out)
            if run.get("profile_table"):
                write_profile(run, run["profile_table"], out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
