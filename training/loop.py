"""The per-worker training loop (runs inside Ray Train workers).

Every worker builds the generator on the meta device, wraps it for data parallelism (FSDP2 or replicas,
`scale.strategy`), materialises only what it holds and initialises it from the seed (the same weights on every
rank), reads its split of the cache, and takes exactly `steps` steps (collectives need the same
count everywhere). The step itself is `training.step.train_step`, the same function the benchmarks time.
Randomness per step (noise, timesteps, CFG drops) comes from a generator seeded by (seed, rank, step), so a
resumed run draws the same numbers as an uninterrupted one. Losses stay on the device between logs: one
reduction every `tracking.log_every` steps (and at checkpoints), no per-step host sync.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, TypeVar

import ray.train
import torch
import torch.distributed.checkpoint as dcp
from ray.train import Checkpoint
from torch.distributed.device_mesh import init_device_mesh

from lidit.cache.contract import manifest_name
from lidit.cache.reader import CacheReader, batch_to_training_inputs
from lidit.encoder import EncoderConfig
from lidit.generator import (
    GeneratorConfig,
    HardNegatives,
    LiDiTGenerator,
    TextBranchSpec,
    TextFeatures,
    count_parameters,
)
from lidit.layout import LayoutTargets
from training.checkpoint import load_training_state, storage_reader, training_state
from training.config import TrainConfig
from training.data import bucketed_batches, head_rows
from training.parallelize import build_parallel, resolve_strategy
from training.state import EMA
from training.step import MetricWindow, build_optimizer, step_generator, train_step

T = TypeVar("T")


def batch_extras(cfg: TrainConfig) -> dict[str, bool]:
    """The optional columns a recipe's batches read (`bucketed_batches` keywords): layout targets and hard
    negatives only when their loss terms are weighted. One decision for the Ray loop and the benchmarks."""
    return {"layout": cfg.model.layout_weight > 0, "negatives": cfg.model.hard_negative_weight > 0}


def build_generator_config(cfg: TrainConfig, reader: CacheReader) -> GeneratorConfig:
    """Generator config from the preset, the ablation switches and the cache's encoder widths."""
    names = cfg.model.encoders or reader.encoder_names
    missing = [n for n in names if n not in reader.encoder_names]
    if missing:
        raise ValueError(f"encoders {missing} are not in the cache (it has {reader.encoder_names})")
    branches = [TextBranchSpec(name=n, hidden_size=reader.manifest.encoder(n).hidden_size) for n in names]
    overrides: dict[str, Any] = dict(cfg.model.overrides)
    overrides.update(fusion=cfg.model.fusion, refiner_causal=cfg.model.refiner_causal)
    overrides["latent_channels"] = reader.manifest.vae.latent_channels
    if cfg.model.layout_weight > 0:
        overrides["layout_head"] = True
    if cfg.model.refiner_depth is not None:
        overrides["refiner_depth"] = cfg.model.refiner_depth
    return GeneratorConfig.from_preset(cfg.model.preset, branches, **overrides)


def select_branches(items: list[T], reader: CacheReader, names: list[str]) -> list[T]:
    """The generator's branches (`names`, its order) of per-encoder items in the cache's manifest order."""
    index = {n: i for i, n in enumerate(reader.encoder_names)}
    return [items[index[n]] for n in names]


def select_negatives(
    negatives: HardNegatives | None, reader: CacheReader, names: list[str]
) -> HardNegatives | None:
    """`select_branches` for a batch's hard negatives."""
    if negatives is None:
        return None
    return HardNegatives(negatives.rows, select_branches(negatives.texts, reader, names))


def select_layout(
    layout: LayoutTargets | None, reader: CacheReader, names: list[str]
) -> LayoutTargets | None:
    """`select_branches` for a batch's layout targets."""
    if layout is None:
        return None
    return LayoutTargets(
        select_branches(layout.targets, reader, names), select_branches(layout.mask, reader, names)
    )


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry: `loop_config` holds the TrainConfig dict and driver-side facts (MLflow run)."""
    cfg = TrainConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scale.use_gpu else torch.device("cpu")
    bf16 = cfg.scale.mixed_precision == "bf16" or (
        cfg.scale.mixed_precision == "auto" and device.type == "cuda"
    )
    torch.set_num_threads(max(1, int(os.environ.get("LIDIT_TRAIN_THREADS", "1"))))

    reader = CacheReader(cfg.cache, version=cfg.cache_version)
    names = cfg.model.encoders or reader.encoder_names
    gen_config = build_generator_config(cfg, reader)
    mesh = init_device_mesh(device.type, (world,))
    num_params = count_parameters(gen_config)
    strategy = resolve_strategy(cfg.scale.strategy, device.type, world, num_params, bf16)
    # Built on the meta device, sharded, then materialised: no rank ever holds the full model (at 10B, 40 GB).
    # The weights depend on the seed only, alike on every rank (training.parallelize.init_weights).
    model = build_parallel(
        gen_config,
        mesh,
        device,
        cfg.seed,
        strategy,
        bf16,
        cfg.scale.activation_checkpointing,
        cfg.scale.compile,
        cfg.scale.reshard_after_forward,
    )
    optim = build_optimizer(model, cfg)
    ema = EMA(model, cfg.optim.ema_decay)
    train_state = torch.zeros(3, dtype=torch.long)  # step, epoch, position in epoch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        # Straight from storage, each rank its own shards: no as_directory() copy of every rank's files.
        ckpt_reader = storage_reader(checkpoint.path, checkpoint.filesystem)
        load_training_state(model, optim, ema, train_state, ckpt_reader)
        if rank == 0:
            print(f"[train] resumed from step {int(train_state[0])}", flush=True)
    if rank == 0:
        print(f"[train] {num_params / 1e6:.1f}M parameters, {strategy} over {world} worker(s)", flush=True)
    start_step, epoch, position = (int(x) for x in train_state)

    tracker = RankZeroTracker(cfg, loop_config, reader, gen_config, names, device) if rank == 0 else None
    # Rank 0's node logs system/*; the first worker of every other node logs system/node_<N>/*.
    node = ctx.get_node_rank() if rank != 0 and ctx.get_local_rank() == 0 else None
    node_metrics = start_system_metrics(cfg, loop_config, f"node_{node}") if node is not None else None
    sample_every, reason = intermediate_sampling(cfg.tracking.sample_every, world)
    if reason and rank == 0:
        print(f"[train] {reason}", flush=True)
    per_worker = cfg.batch_size // world
    batches = bucketed_batches(
        reader,
        per_worker,
        rank,
        world,
        cfg.seed,
        epoch,
        position,
        **batch_extras(cfg),
    )
    fail_marker = Path(cfg.storage_path) / cfg.name / ".failed_once"
    window = MetricWindow()
    loss_value = float("nan")
    last_step = min(cfg.steps, cfg.stop_after or cfg.steps)
    for step in range(start_step, last_step):
        if cfg.fail_at_step is not None and step == cfg.fail_at_step and rank == world - 1:
            if not fail_marker.exists():
                fail_marker.parent.mkdir(parents=True, exist_ok=True)
                fail_marker.write_text("worker killed on purpose by fail_at_step\n")
                print(f"[train] rank {rank}: dying at step {step} (fail_at_step test hook)", flush=True)
                # Ray Train V2 registers a checkpoint only once its controller has polled that report from
                # every worker (one poll per health-check interval, 2 s by default): a worker dying sooner
                # loses it and the group restarts from the checkpoint before. Die as a crash would, later.
                time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")) + 1.0)
                os._exit(1)
        batch = next(batches)
        epoch, position = batch.epoch, batch.position
        texts = select_branches(batch.texts, reader, names)
        layout = select_layout(batch.layout, reader, names)
        hard = select_negatives(batch.negatives, reader, names)
        draws = step_generator(cfg.seed, rank, step)
        out = train_step(model, optim, ema, batch.latents, texts, cfg, step, draws, device, hard, layout)
        window.add(out)
        done = step + 1
        train_state = torch.tensor([done, epoch, position], dtype=torch.long)
        log_now = done % cfg.tracking.log_every == 0 or done == cfg.steps
        checkpoint_now = done % cfg.checkpoint.every == 0 or done == last_step
        if log_now or checkpoint_now:  # every rank reduces at the same steps (a collective)
            loss_value, grad_norm = window.reduce()
        if log_now:
            steps_in_window = window.steps
            elapsed = window.reset()
            if tracker:
                tracker.log_metrics(
                    done,
                    {
                        "loss": loss_value,
                        "lr": optim.param_groups[0]["lr"],
                        "grad_norm": grad_norm,
                        "samples_per_s": steps_in_window * cfg.batch_size / max(elapsed, 1e-9),
                        "epoch": epoch,
                    },
                )
        if sample_every and done % sample_every == 0 and done < cfg.steps:
            weights = ema.full_state_dict()  # one worker: nobody to stall (see intermediate_sampling)
            if tracker:
                tracker.log_samples(done, weights)
        metrics = {"step": done, "loss": loss_value, "epoch": epoch}
        if checkpoint_now:
            save_and_report(model, optim, ema, train_state, metrics)

    if node_metrics is not None:
        node_metrics.finish()
    if last_step < cfg.steps:  # stopped early on purpose: the checkpoint is the result
        if tracker:
            tracker.close()
        ray.train.report({"step": last_step, "loss": loss_value, "done": False})
        return

    # Export the EMA generator, draw the final grid and register (rank 0). Every rank joins the gather (one
    # parameter at a time, kept on rank 0 only); after it no collective is pending, so the other ranks report
    # and finish while rank 0 samples on its CPU, and no collective can time out waiting for it.
    weights = ema.full_state_dict()
    final: dict[str, Any] = {"step": cfg.steps, "loss": loss_value, "done": True}
    if tracker:
        final.update(tracker.finish(weights))
        tracker.close()
    ray.train.report(final)


def start_system_metrics(cfg: TrainConfig, loop_config: dict, node_id: str | None) -> Any:
    """MLflow's system-metrics thread (CPU, memory, GPU of this node) logging into the run, or None when off.

    `node_id` None logs `system/*` (rank 0's node); else `system/<node_id>/*`, so nodes never mix."""
    if not cfg.tracking.system_metrics_every_s:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        loop_config["mlflow_run_id"],
        sampling_interval=cfg.tracking.system_metrics_every_s,
        resume_logging=True,  # a resumed run continues the step count of its system metrics
        node_id=node_id,
        tracking_uri=loop_config["tracking_uri"],
    )
    monitor.start()
    return monitor


def intermediate_sampling(sample_every: int, world: int) -> tuple[int, str | None]:
    """`tracking.sample_every` as this run honours it, and why not when it cannot.

    A grid is drawn on rank 0 from the gathered EMA weights on its CPU. With one worker that only pauses the
    run; with several, the other ranks would sit in their next step's collective until rank 0 is done, and on
    NCCL a grid that outlasts the collective timeout kills the job. So with 2+ workers intermediate grids are
    skipped (said once) and the grid is drawn after the loop, where nothing waits on a collective.
    """
    if not sample_every or world == 1:
        return sample_every, None
    return 0, (
        f"tracking.sample_every={sample_every} skipped: with {world} workers an intermediate grid would "
        "stall the other ranks in their next collective; the sample grid is drawn after the last step"
    )


def save_and_report(model: Any, optim: Any, ema: EMA, train_state: torch.Tensor, metrics: dict) -> None:
    """Every rank writes its DCP shard into a local folder; Ray merges them into `step_NNNNNN` in storage."""
    state = training_state(model, optim, ema, train_state)
    with tempfile.TemporaryDirectory(prefix="lidit-ckpt-") as tmp:
        dcp.save(state, checkpoint_id=tmp)
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step_{int(train_state[0]):06d}",
        )


class RankZeroTracker:
    """MLflow logging, sample grids, export and registration; lives on rank 0 only."""

    def __init__(
        self,
        cfg: TrainConfig,
        loop_config: dict,
        reader: CacheReader,
        gen_config: GeneratorConfig,
        names: list[str],
        device: torch.device,
    ) -> None:
        import mlflow

        self.cfg, self.reader, self.gen_config, self.names = cfg, reader, gen_config, names
        self.device = device
        self.run_id = loop_config["mlflow_run_id"]
        mlflow.set_tracking_uri(loop_config["tracking_uri"])
        self.mlflow = mlflow
        self.client = mlflow.MlflowClient()
        self.losses: list[tuple[int, float]] = []
        self._vae = None
        self._samples: tuple | None = None
        self._system = start_system_metrics(cfg, loop_config, node_id=None)

    def close(self) -> None:
        """Stop the system metrics thread (after its last sample is logged)."""
        if self._system is not None:
            self._system.finish()
            self._system = None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.losses.append((step, metrics["loss"]))
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), step=step)
        print(
            f"[train] step {step}/{self.cfg.steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
            f"{metrics['samples_per_s']:.1f} samples/s",
            flush=True,
        )

    def _sample_inputs(self) -> tuple[list[TextFeatures], list[str], tuple[int, int]]:
        if self._samples is None:
            n = max(1, self.cfg.tracking.num_samples)
            batch = head_rows(self.reader, n)
            latents, texts, _ = batch_to_training_inputs(batch, self.reader)
            self._samples = (
                select_branches(texts, self.reader, self.names),
                batch.column("caption").to_pylist(),
                latents.shape[2:],
            )
        return self._samples

    def sample_images(self, weights: dict[str, torch.Tensor]) -> tuple[Any, list[str]]:
        from diffusers import AutoencoderKL

        from lidit.images import make_grid
        from lidit.pipeline import LiDiTPipeline

        generator = LiDiTGenerator(self.gen_config)
        generator.load_state_dict(weights, strict=True)
        if self._vae is None:
            self._vae = AutoencoderKL.from_pretrained(self.reader.vae_path)
        texts, captions, (h, w) = self._sample_inputs()
        pipe = LiDiTPipeline(
            generator, self._vae, self.cfg.model.objective, flow_shift=self.cfg.model.flow_shift
        )
        uncond = [t.drop_prompt(torch.ones(t.mask.shape[0], dtype=torch.bool)) for t in texts]
        seeds = list(range(len(captions)))
        latents = pipe.sample(
            texts, uncond, seeds, h, w, self.cfg.tracking.sample_steps, self.cfg.tracking.guidance_scale
        )
        return make_grid(pipe.decode(latents), labels=captions, max_label_lines=3), captions

    def log_samples(self, step: int, weights: dict[str, torch.Tensor]) -> None:
        grid, captions = self.sample_images(weights)
        self.client.log_image(self.run_id, grid, artifact_file=f"samples/step_{step:06d}.png")
        self.client.log_text(self.run_id, "\n".join(captions), artifact_file="samples/prompts.txt")

    def _loss_plot(self, directory: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        if self.losses:
            steps, values = zip(*self.losses, strict=True)
            ax.plot(steps, values)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.set_title(self.cfg.name)
        fig.tight_layout()
        path = directory / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def evaluate(self, export: Path) -> dict[str, float]:
        """Held-out scores of the exported pipeline, loaded back from `export` as a server loads it (portable
        locations resolved, fingerprints checked), on this rank's device; logged as heldout.* run metrics."""
        from lidit.experiment import EvalSection, evaluate_pipeline, report_metrics
        from lidit.pipeline import LiDiTPipeline
        from lidit.starter import heldout_prompts

        track = self.cfg.tracking
        prompts = heldout_prompts(track.eval_starter, track.eval_prompts)
        pipe = LiDiTPipeline.from_pretrained(export, device=self.device, models_root=self.cfg.models_root)
        settings = EvalSection(
            prompts=len(prompts),
            sample_steps=track.sample_steps,
            guidance_scale=track.guidance_scale,
            batch_size=track.eval_batch_size,
        )
        started = time.perf_counter()
        report, _ = evaluate_pipeline(pipe, prompts, settings, size=self.reader.manifest.image.resolution)
        flat = report_metrics(report.to_dict())
        metrics = {f"heldout.{k}": float(v) for k, v in flat.items() if v is not None}
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, value, step=self.cfg.steps)
        self.client.log_dict(
            self.run_id, {"settings": settings.model_dump(), **report.to_dict()}, "eval/heldout.json"
        )
        print(
            f"[train] held-out eval ({len(prompts)} prompts, {time.perf_counter() - started:.0f} s): "
            + ", ".join(
                f"{k.removeprefix('heldout.')} {v:.2f}" for k, v in metrics.items() if "pos." not in k
            ),
            flush=True,
        )
        return metrics

    def finish(self, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        from lidit.pipeline import LiDiTPipeline, PipelineSpec
        from lidit.pyfunc import save_pyfunc
        from lidit.registry import PIPELINE_ARTIFACT, git_commit, register_pipeline

        generator = LiDiTGenerator(self.gen_config)
        generator.load_state_dict(weights, strict=True)
        spec, absolute = PipelineSpec(
            objective=self.cfg.model.objective,
            flow_shift=self.cfg.model.flow_shift,
            encoders=[EncoderConfig.model_validate(self.reader.encoder_config(n)) for n in self.names],
            encoder_fingerprints={n: self.reader.encoder_fingerprints[n] for n in self.names},
            vae=self.reader.vae_path,
            vae_fingerprint=self.reader.vae_fingerprint,
            default_size=self.reader.manifest.image.resolution,
            extra={
                "cache": self.cfg.cache,
                "cache_version": str(self.reader.version),
                "git_commit": git_commit(),
            },
        ).portable(self.cfg.models_root)
        for what in absolute:  # still loads here, but not on a machine where the path differs
            print(
                f"[train] warning: {what} is outside models_root {self.cfg.models_root}: exported by absolute "
                "path, so this version only serves where that path exists",
                flush=True,
            )
        out: dict[str, Any] = {"mlflow_run_id": self.run_id}
        with tempfile.TemporaryDirectory(prefix="lidit-export-") as tmp:
            export = Path(tmp) / PIPELINE_ARTIFACT
            LiDiTPipeline(generator, None, self.cfg.model.objective).save_pretrained(export, spec)
            # Logged as an MLflow pyfunc model directory (pipeline under artifacts/pipeline/): the registered
            # version then loads with mlflow.pyfunc.load_model as well as with LiDiTPipeline.
            model_dir = save_pyfunc(export, Path(tmp) / "model")
            self.client.log_artifacts(self.run_id, str(model_dir), artifact_path=PIPELINE_ARTIFACT)
            self.client.log_artifact(self.run_id, str(self._loss_plot(Path(tmp))), artifact_path="plots")
            scores = self.evaluate(export) if self.cfg.tracking.eval_starter else {}
        if self.cfg.tracking.num_samples:
            self.log_samples(self.cfg.steps, weights)
        if self.cfg.tracking.registered_model:
            tags = {
                "cache": self.cfg.cache,
                "cache_version": str(self.reader.version),
                "cache_manifest": f"{self.reader.uri}/{manifest_name(self.reader.version)}",
                "vae": spec.vae_fingerprint or "",
                "git_commit": spec.extra["git_commit"],
                **{f"encoder.{n}": fp for n, fp in spec.encoder_fingerprints.items()},
                # The version carries the scores of exactly these weights (the run's heldout.* metrics).
                **{f"eval.{k}": f"{v:.4f}" for k, v in scores.items()},
            }
            version = register_pipeline(
                self.run_id, self.cfg.tracking.registered_model, tags=tags, alias=self.cfg.tracking.alias
            )
            out.update(model_name=self.cfg.tracking.registered_model, model_version=version)
            print(f"[train] registered {self.cfg.tracking.registered_model} version {version}", flush=True)
        self.client.log_text(self.run_id, json.dumps(out), artifact_file="result.json")
        return out
