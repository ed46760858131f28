"""`lidit quickstart`: the whole path on the embedded defaults, end to end, on one machine.

starter assets -> feature cache (Ray) -> FSDP2 training with 2 workers (Ray Train) -> registered and
aliased MLflow version -> Ray Serve on 127.0.0.1 -> images for held-out prompts over HTTP -> evaluator scores
-> sample grid + summary. Everything lives under LIDIT_HOME; a second run reuses the starter assets, the cache
and the trained checkpoint.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.config import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "starter"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "quickstart", help="run the whole path on the starter defaults (about 8 min on 2 cores)"
    )
    parser.add_argument(
        "--preset", default="default", choices=["default", "micro"], help="starter asset size"
    )
    parser.add_argument(
        "--train-config",
        type=Path,
        default=CONFIG_DIR / "train.yaml",
        help="training recipe; the version it registers is the one served and scored (e.g. "
        "configs/starter/train_long_layout.yaml: its Ray jobs scored held-out colour / shape / binding "
        "1.00 / 0.78-0.84 / 0.76-0.84 after 52-61 min of training on a slow 2-core box)",
    )
    parser.add_argument(
        "--starter-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="starter override, as `lidit starter build --set` takes it (configs/starter/train_shapes.yaml "
        "wants data.grid=8)",
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--prompts", type=int, default=100, help="held-out prompts to generate and score")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight (the server batches them)"
    )
    parser.add_argument("--sample-steps", type=int, default=20, help="sampler steps per image")
    parser.add_argument("--port", type=int, default=0, help="serving port (0 = a free one)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary object at the end")
    parser.set_defaults(handler=run)


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOCAL_UI = "http://127.0.0.1:5000"


def mlflow_ui_command(tracking_uri: str) -> str | None:
    """The command that serves a local store's UI at LOCAL_UI (None for a tracking server: it has its UI)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def mlflow_run_url(tracking_uri: str, run_id: str) -> str:
    """URL of the run in the UI's model-training view (MLflow 3 opens experiments in GenAI mode otherwise)."""
    import mlflow

    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def served_model(train_cfg: TrainConfig) -> list[str]:
    """Serve-config overrides that serve the version the training recipe registers, under its alias."""
    from lidit.config import ConfigError

    name, alias = train_cfg.tracking.registered_model, train_cfg.tracking.alias
    if not name or not alias:
        raise ConfigError(
            "the quickstart serves the version its training recipe registers: set tracking.registered_model "
            "and tracking.alias in the recipe"
        )
    return [f"model=models:/{name}@{alias}", f"served_model_name={name}"]


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster import ensure_ray
    from lidit.config import lidit_home, load_config
    from lidit.images import make_grid
    from lidit.registry import configure_mlflow, mlflow_tracking_uri
    from lidit.starter import build_starter, heldout_prompts, starter_config
    from lidit.starter.evaluator import format_report, score_folder, write_image_folder
    from pipelines.build import build_cache
    from pipelines.config import load_build_config
    from serving.client import generate
    from serving.config import ServeConfig
    from serving.run import start
    from training.config import TrainConfig
    from training.train import check_resume, run_training

    home = lidit_home()
    # The recipe is read first, so a wrong path or key fails in one line before any stage runs. The run and its
    # registered version carry the held-out scores of exactly the exported weights.
    overrides = [f"tracking.eval_starter={home / 'starter'}", f"tracking.eval_prompts={args.prompts}"]
    overrides += [f"steps={args.steps}"] if args.steps else []
    train_cfg = load_config(TrainConfig, args.train_config, overrides)
    serve_model = served_model(train_cfg)
    starter_config(args.preset, args.starter_set)  # a bad override fails here too, before any stage
    check_resume(train_cfg)  # and a home whose run the recipe cannot resume (another optimizer layout)
    out = home / "quickstart"
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    configure_mlflow()  # before Ray starts, so every worker and replica inherits the tracking URI

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        _log(f"{name} done in {timings[name]} s")

    t0 = time.perf_counter()
    with_sets = f" with {', '.join(args.starter_set)}" if args.starter_set else ""
    _log(f"1/6 starter assets ({args.preset}{with_sets}) under {home / 'starter'}")
    assets = build_starter(home / "starter", preset=args.preset, overrides=args.starter_set, progress=True)
    stage("starter", t0)

    # One Ray for every stage (cluster.ensure_ray: the cluster $RAY_ADDRESS names, else a private local one
    # sized for fractional actors + tasks).
    started_ray = ensure_ray()
    url = None
    try:
        t0 = time.perf_counter()
        _log("2/6 feature cache (Ray: decode -> VAE latents -> LLM states -> shards)")
        cache_cfg = load_build_config(CONFIG_DIR / "cache.yaml", ["mlflow=true"])
        cache = build_cache(cache_cfg)
        stage("cache", t0)

        t0 = time.perf_counter()
        workers, strategy = train_cfg.scale.workers, train_cfg.scale.strategy
        _log(
            f"3/6 training {train_cfg.steps} steps, {workers} workers (Ray Train, scale.strategy {strategy})"
        )
        trained = run_training(train_cfg)
        stage("train", t0)

        t0 = time.perf_counter()
        port = [f"port={args.port or _free_port()}"]
        serve_cfg = load_config(ServeConfig, CONFIG_DIR / "serve.yaml", serve_model + port)
        _log(f"4/6 serving {serve_cfg.model} (Ray Serve on {serve_cfg.host}:{serve_cfg.port})")
        url = start(serve_cfg)
        stage("serve_start", t0)

        t0 = time.perf_counter()
        prompts = heldout_prompts(assets, args.prompts)
        _log(f"5/6 generating {len(prompts)} held-out prompts through {url}/v1/images/generations")
        from concurrent.futures import ThreadPoolExecutor

        from PIL import Image

        def one(i: int) -> Any:
            png = generate(
                url, prompts[i][0], n=1, size="64x64", seed=i, num_inference_steps=args.sample_steps
            )
            return Image.open(io.BytesIO(png[0])).convert("RGB")

        # Concurrent requests, so the server's batching fills its batches; results stay in prompt order.
        with ThreadPoolExecutor(max(1, args.concurrency)) as pool:
            images = list(pool.map(one, range(len(prompts))))
        items = [(im, prompt, spec) for im, (prompt, spec) in zip(images, prompts, strict=True)]
        folder = write_image_folder(out / "generated", items)
        stage("generate", t0)

        t0 = time.perf_counter()
        _log("6/6 scoring with the compositional evaluator")
        report = score_folder(folder)
        grid_path = out / "grid.png"
        # Tiles at 2x (nearest) so each prompt fits under its image in a readable font.
        tiles = [im.resize((im.width * 2, im.height * 2), Image.Resampling.NEAREST) for im, _, _ in items]
        make_grid(tiles, cols=10, labels=[p for _, p, _ in items]).save(grid_path)
        (out / "prompts.txt").write_text("\n".join(p for _, p, _ in items) + "\n")
        stage("evaluate", t0)
    finally:
        if url is not None:
            serve.shutdown()
        if started_ray:
            ray.shutdown()

    summary: dict[str, Any] = {
        "lidit_home": str(home),
        "starter": str(assets.root),
        "cache": {"uri": cache.get("uri"), "version": cache.get("version"), "rows": cache.get("rows")},
        "training": trained,
        "model": f"models:/{trained['model_name']}@{train_cfg.tracking.alias}",
        "endpoint": url,
        "eval": report.to_dict(),
        "grid": str(grid_path),
        "generated": str(folder),
        "mlflow_tracking_uri": mlflow_tracking_uri(),
        "mlflow_ui": mlflow_ui_command(mlflow_tracking_uri()),
        "mlflow_run_url": mlflow_run_url(mlflow_tracking_uri(), trained["mlflow_run_id"]),
        "seconds": {**timings, "total": round(time.perf_counter() - t_all, 1)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            format_report(
                report, title=f"held-out prompts, {trained['model_name']} v{trained['model_version']}"
            )
        )
        print(
            f"\ngrid:      {grid_path}\nsummary:   {out / 'summary.json'}\ncache:     {summary['cache']['uri']}"
            f" (version {summary['cache']['version']})\nmodel:     {summary['model']} (version "
            f"{trained['model_version']})\nendpoint:  {url} (stopped)\nMLflow run: {summary['mlflow_run_url']}"
            + (f"\n           (start the UI first: {summary['mlflow_ui']})" if summary["mlflow_ui"] else "")
            + "\n"
            f"total:     {summary['seconds']['total']} s"
        )
    return 0
