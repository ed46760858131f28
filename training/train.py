"""Driver: `python -m training.train CONFIG.yaml [--steps N] [--workers N] [--set k=v] [--json]`.

Connects to the running Ray cluster if there is one (RAY_ADDRESS or a local head started with `ray start`),
else starts a local Ray. Creates (or, on resume, reuses) the MLflow run, then runs the Ray Train V2
`TorchTrainer`. Starting the same `storage_path` + `name` again resumes from its latest checkpoint (a run
that already ended at `steps` is returned as it is, not started again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from cluster import ensure_ray
from lidit.config import ConfigError, dump_config, load_config
from lidit.registry import configure_mlflow
from training.args import add_arguments
from training.config import TrainConfig

if TYPE_CHECKING:
    from training.checkpoint import LatestCheckpoint

RUN_TAG = "lidit.run"


# Keys of one invocation, not of the run: a resumed run may set them differently (or a test hook).
INVOCATION_KEYS = ("fail_at_step", "stop_after")


def find_run(cfg: TrainConfig) -> Any:
    """The newest MLflow run of this training run (same storage + name), or None."""
    import mlflow

    configure_mlflow(cfg.tracking.experiment)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    found = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_key(cfg)}'", max_results=1
    )  # newest first
    return found[0] if found else None


def run_key(cfg: TrainConfig) -> str:
    return f"{cfg.storage_path}/{cfg.name}"


def mlflow_run(cfg: TrainConfig, reader: Any) -> str:
    """The MLflow run of this training run: reused when the same storage + name resumes.

    A new run gets the resolved params (`run_params`) and the cache as its dataset input (`log_cache_input`).
    """
    import mlflow

    found = find_run(cfg)
    if found and found.info.status != "FINISHED":
        return found.info.run_id
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.create_run(exp.experiment_id, run_name=cfg.name, tags={RUN_TAG: run_key(cfg)})
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in run_params(cfg, reader).items()]
    for start in range(0, len(params), 100):  # MLflow's batch limit
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    log_cache_input(client, run.info.run_id, reader)
    return run.info.run_id


def run_params(cfg: TrainConfig, reader: Any) -> dict[str, str]:
    """What the run trains with, every value resolved: the config with its defaults filled from the cache
    (encoders, cache version, refiner depth), the generator's constructor config, and parameter counts.
    No None values (an unset option is absent) and no per-invocation keys (`INVOCATION_KEYS`)."""
    import torch

    from lidit.generator import LiDiTGenerator
    from training.loop import build_generator_config

    flat = flatten(dump_config(cfg))
    gen = build_generator_config(cfg, reader)
    flat.update(
        {
            "cache_version": reader.version,
            "model.encoders": cfg.model.encoders or reader.encoder_names,
            "model.refiner_depth": gen.refiner_depth,
        }
    )
    out = {k: v for k, v in flat.items() if v is not None and k not in INVOCATION_KEYS}
    out.update(
        {f"generator.{k}": v for k, v in flatten(gen.model_dump(mode="json")).items() if v is not None}
    )
    with torch.device("meta"):  # counts without allocating weights
        model = LiDiTGenerator(gen)
    out["params.total"] = sum(p.numel() for p in model.parameters())
    for name, child in model.named_children():
        out[f"params.{name}"] = sum(p.numel() for p in child.parameters())
    return {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in out.items()}


def log_cache_input(client: Any, run_id: str, reader: Any) -> None:
    """The feature cache as the run's MLflow dataset input: source = its manifest URI, digest = the manifest's
    content hash, profile = version, rows, shards and the encoder and VAE fingerprints."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    from lidit.cache.contract import manifest_name
    from lidit.fingerprint import hash_json

    manifest = reader.manifest
    profile = {
        "version": manifest.version,
        "rows": manifest.rows,
        "shards": len(manifest.shards),
        "vae_fingerprint": reader.vae_fingerprint,
        **{f"encoder.{n}": fp for n, fp in reader.encoder_fingerprints.items()},
    }

    class CacheDataset(MetaDataset):
        """MetaDataset with a profile (MLflow's base `to_dict` leaves the profile out)."""

        @property
        def profile(self) -> dict[str, Any]:
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    uri = f"{reader.uri}/{manifest_name(manifest.version)}"
    dataset = CacheDataset(
        resolve_dataset_source(uri),
        name=f"feature-cache-v{manifest.version}",
        digest=hash_json(manifest.model_dump(mode="json"))[:16],
    )
    context = InputTag(key="mlflow.data.context", value="training")
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[context])])


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_against_cache(cfg: TrainConfig, reader: Any) -> None:
    """Config errors that need the cache, raised on the driver before Ray starts or an MLflow run opens:
    encoders the cache lacks, generator overrides that are not GeneratorConfig fields or do not fit the preset,
    a batch no bucket can fill. Each is one-line `ConfigError` naming the key and what it may be."""
    from pydantic import ValidationError

    from training.data import CacheIndex
    from training.loop import build_generator_config

    if cfg.model.hard_negative_weight > 0 and not reader.has_negatives:
        raise ConfigError(
            f"model.hard_negative_weight: the cache {reader.uri} has no negative captions; set a source's "
            "negative_caption_column and rebuild it (lidit cache build), or set 0"
        )
    if cfg.model.layout_weight > 0 and not reader.has_layout:
        raise ConfigError(
            f"model.layout_weight: the cache {reader.uri} has no layout targets; set a source's "
            "grounding_column and rebuild it (lidit cache build), or set 0"
        )
    missing = [n for n in cfg.model.encoders or [] if n not in reader.encoder_names]
    if missing:
        raise ConfigError(
            f"model.encoders: {', '.join(missing)} not in the cache {reader.uri}; "
            f"choose from {', '.join(reader.encoder_names)}"
        )
    try:
        build_generator_config(cfg, reader)
    except TypeError as exc:  # e.g. model.overrides repeating a key the preset call already passes
        raise ConfigError(f"model.overrides: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"model (preset {cfg.model.preset} + model.overrides): {problems}") from None
    if cfg.tracking.eval_starter:
        from lidit.starter import heldout_prompts

        try:  # read here so a wrong path fails now, not after the last step on rank 0
            found = len(heldout_prompts(cfg.tracking.eval_starter, 1))
        except OSError as exc:  # FileNotFoundError included
            raise ConfigError(f"tracking.eval_starter: {exc}") from None
        if not found:
            raise ConfigError(f"tracking.eval_starter: {cfg.tracking.eval_starter} has no held-out prompts")
    try:
        warnings = CacheIndex.build(reader).check(cfg.batch_size)
    except ValueError as exc:
        raise ConfigError(f"batch_size: {exc}") from None
    # Rows that can never train are a warning, not an error: the run goes on without them.
    for warning in warnings:
        print(f"[train] warning: {warning}", file=sys.stderr, flush=True)


def check_resume(cfg: TrainConfig) -> LatestCheckpoint | None:
    """The checkpoint a run resumes from (same `storage_path` + `name`), if any, checked on the driver before
    Ray starts: one the config cannot load is one config error naming the key."""
    from training.checkpoint import CheckpointMismatchError, check_param_groups, latest_checkpoint
    from training.step import optimizer_group_count

    checkpoint = latest_checkpoint(cfg.storage_path, cfg.name)
    if checkpoint is not None:
        try:
            check_param_groups(checkpoint.reader(), optimizer_group_count(cfg.optim.text_lr_scale))
        except CheckpointMismatchError as exc:
            raise ConfigError(f"optim.text_lr_scale: {exc}") from None
    return checkpoint


def finished_summary(cfg: TrainConfig, checkpoint: LatestCheckpoint | None, started: float) -> dict | None:
    """`run_training`'s summary of a run that already ended at `steps`, or None if there is one to train.

    Starting a finished run again trains nothing, exports nothing and registers no second version of the same
    weights: the quickstart's second run and a killed ladder that resumes reuse the run as it is."""
    if checkpoint is None or checkpoint.step != cfg.steps:
        return None
    run = find_run(cfg)
    if run is None or run.info.status != "FINISHED":
        return None
    import mlflow

    client = mlflow.MlflowClient()
    print(
        f"[train] {run_key(cfg)} already finished at step {cfg.steps} (MLflow run {run.info.run_id}): nothing "
        "to train; raise `steps` to train on, or change `name` for a fresh run",
        file=sys.stderr,
        flush=True,
    )
    summary = run_summary(
        client, cfg, run.info.run_id, cfg.steps, run.data.metrics.get("loss"), checkpoint.path, started
    )
    # `seconds` is this call's; what training that run took is its MLflow run's span (first start to end,
    # so a run killed and resumed counts the time in between too).
    summary["already_finished"] = True
    summary["run_seconds"] = round((run.info.end_time - run.info.start_time) / 1000, 1)
    return summary


def run_summary(
    client: Any, cfg: TrainConfig, run_id: str, steps: Any, loss: Any, checkpoint: str | None, started: float
) -> dict[str, Any]:
    """What `run_training` returns (and `--json` prints) for MLflow run `run_id`."""
    # Rank 0 registered the version; the trainer's result only carries checkpointed metrics, so ask MLflow.
    versions = client.search_model_versions(f"run_id = '{run_id}'") if cfg.tracking.registered_model else []
    latest = max(versions, key=lambda v: int(v.version), default=None)
    return {
        "mlflow_run_id": run_id,
        "model_name": latest.name if latest else None,
        "model_version": latest.version if latest else None,
        "steps": steps,
        "final_loss": loss,
        "checkpoint": checkpoint,
        "storage": run_key(cfg),
        "seconds": round(time.perf_counter() - started, 1),
        "already_finished": False,
    }


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training to `cfg.steps`; returns the summary printed by `--json`."""
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lidit.cache.reader import CacheReader
    from training.loop import train_loop_per_worker

    started = time.perf_counter()
    reader = CacheReader(cfg.cache, version=cfg.cache_version)
    check_against_cache(cfg, reader)  # every config error before Ray starts and before the MLflow run
    finished = finished_summary(cfg, check_resume(cfg), started)
    if finished is not None:
        return finished
    ensure_ray()
    run_id = mlflow_run(cfg, reader)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": dump_config(cfg),
            "mlflow_run_id": run_id,
            "tracking_uri": mlflow.get_tracking_uri(),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scale.workers,
            use_gpu=cfg.scale.use_gpu,
            resources_per_worker={
                "CPU": cfg.scale.cpus_per_worker,
                **({"GPU": 1} if cfg.scale.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
        # No Ray Data split: each worker reads its slice of a per-epoch plan that every rank computes alike
        # (training/data.py), so step counts match across ranks and a resumed run replays the same order.
    )
    result = trainer.fit()
    if result.error:
        mlflow.MlflowClient().set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"training failed: {result.error}")
    client = mlflow.MlflowClient()
    metrics = result.metrics or {}
    if metrics.get("step") == cfg.steps:  # a `stop_after` run keeps its MLflow run open for the rest
        client.set_terminated(run_id, status="FINISHED")
    checkpoint = result.checkpoint.path if result.checkpoint else None
    return run_summary(client, cfg, run_id, metrics.get("step"), metrics.get("loss"), checkpoint, started)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config from CONFIG + flags; a bad key or value is a one-line `ConfigError` naming it."""
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.workers is not None:
        overrides.append(f"scale.workers={args.workers}")
    try:
        return load_config(TrainConfig, args.config, overrides)
    except ConfigError as exc:  # one line per problem -> one line: `header key: message; key: message`
        head, *problems = str(exc).splitlines()
        raise ConfigError(f"{head} {'; '.join(p.strip() for p in problems)}".strip()) from None


def run_from_args(args: argparse.Namespace) -> int:
    summary = run_training(config_from_args(args))
    if args.json:
        print(json.dumps(summary))
    else:
        loss = "" if summary["final_loss"] is None else f", final loss {summary['final_loss']:.4f}"
        version = summary["model_version"]
        registered = f"; registered {summary['model_name']} v{version}" if version else ""
        print(
            f"trained {summary['steps']} steps{loss} in {summary['seconds']} s\n"
            f"MLflow run {summary['mlflow_run_id']}{registered}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__)
    add_arguments(parser)
    try:
        return run_from_args(parser.parse_args(argv))
    except ConfigError as exc:  # what `lidit train` does too: one line, exit code 2, nothing started
        print(f"python -m training.train: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
