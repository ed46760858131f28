"""`lidit experiment run CONFIG.yaml`: train and score ablation variants with one shared budget.

starter assets -> a feature cache with every encoder the variants need (Ray) -> for each variant and
seed: a training run (Ray Train + FSDP2, its own MLflow run) -> the exported pipeline scored on held-out
prompts (the compositional evaluator; scores logged into that MLflow run) -> a results table (markdown +
JSON), a plot of accuracy by where objects are named in the prompt, one image grid per variant.

Finished (variant, seed) results are files in the work directory: running the same command again after a
kill continues where it stopped and trains nothing twice; a killed training run resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from cli.common import group_help

REPORT_NAME = "ladder"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "experiment",
        help="ablation experiments: train variants with one budget, score them, write a results table",
        description="Ablation experiments on the starter set (see configs/experiments/).",
    )
    parser.set_defaults(handler=lambda _args: group_help(parser))
    commands = parser.add_subparsers(dest="experiment_command", metavar="COMMAND")
    run_p = commands.add_parser("run", help="train + score every variant and seed, then write the report")
    run_p.add_argument("config", help="experiment YAML, e.g. configs/experiments/ablation_ladder.yaml")
    run_p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an experiment field, e.g. steps=100 or eval.prompts=32 (repeatable)",
    )
    run_p.add_argument("--variants", default=None, help="comma-separated subset of variant names")
    run_p.add_argument(
        "--results", default=None, metavar="DIR", help="where the table/plot go (default: WORK_DIR/report)"
    )
    run_p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    run_p.set_defaults(handler=_run)


def _log(msg: str) -> None:
    print(f"[experiment] {msg}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    from lidit.config import ConfigError, load_config
    from lidit.experiment import ExperimentConfig

    cfg = load_config(ExperimentConfig, args.config, args.overrides)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        try:
            cfg = cfg.model_copy(update={"variants": [cfg.variant(v) for v in wanted]})
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
    command = ["lidit", *sys.argv[1:]]
    summary = run_experiment(cfg, Path(args.results) if args.results else None, command=command)
    if args.json:
        print(json.dumps(summary))
    else:
        print(Path(summary["report"]["markdown"]).read_text())
    return 0


# -- stages --------------------------------------------------------------------------------------------------


def ladder_cache_config(cfg: Any, assets: Any, output: Path) -> Any:
    """The cache build config: stage settings from `cfg.cache_config`, sources/VAE/encoders from the starter."""
    from lidit.encoder import EncoderConfig
    from pipelines.config import CacheBuildConfig, load_build_config

    base = load_build_config(
        cfg.cache_config, cfg.cache_set, sources=[str(assets.train_parquet)], output=str(output)
    )
    template = base.encoders[0]  # layer, max_length, dtype and instruction text of the base config
    encoders = [
        EncoderConfig(
            name=e.name,
            path=str(assets.lm_llama if e.lm == "llama" else assets.lm_qwen2),
            system_prompt=template.system_prompt,
            instruction=template.instruction if e.instruction else "",
            layer=template.layer,
            max_length=template.max_length,
            dtype=template.dtype,
        )
        for e in cfg.encoders
    ]
    data = base.model_dump()
    data.update(encoders=[e.model_dump() for e in encoders], vae=str(assets.vae))
    return CacheBuildConfig.model_validate(data)


def train_overrides(cfg: Any, variant: Any, seed: int, cache_uri: str, storage: Path) -> list[str]:
    """Training `--set` list of one (variant, seed): experiment-wide settings, the shared budget, the run's
    identity, then the variant's own switches."""
    return [
        *cfg.train_set,
        f"name={run_name(cfg, variant, seed)}",
        f"cache={cache_uri}",
        f"storage_path={storage}",
        f"steps={cfg.steps}",
        f"batch_size={cfg.batch_size}",
        f"seed={seed}",
        f"model.encoders=[{', '.join(variant.encoders)}]",
        f"tracking.experiment={cfg.name}",
        "tracking.registered_model=null",  # variants are results, not versions to serve
        "tracking.alias=null",
        "tracking.num_samples=0",  # the evaluation below makes the images
        *variant.set,
    ]


def run_name(cfg: Any, variant: Any, seed: int) -> str:
    return f"{cfg.name}-{variant.name}-s{seed}"


def data_key(reader: Any, variant: Any) -> dict[str, Any]:
    """What a variant's training data is: its encoders' and the VAE's fingerprints and the row count."""
    return {
        "encoders": {n: reader.encoder_fingerprints[n] for n in variant.encoders},
        "vae": reader.vae_fingerprint,
        "rows": reader.num_rows,
    }


def load_result(file: Path, overrides: list[str], data: dict[str, Any]) -> dict[str, Any]:
    """A finished (variant, seed) result, only if it was trained with the same settings on the same data."""
    from lidit.config import ConfigError

    result = json.loads(file.read_text())
    for key, want in (("train_overrides", overrides), ("data", data)):
        if result.get(key) != want:
            raise ConfigError(
                f"{file} was trained with other settings or data than this run has ({key}: had "
                f"{result.get(key)}, now {want}); use another work_dir or delete it"
            )
    return result


def _write_json(path: Path, obj: Any) -> None:
    """Atomic: a killed run never leaves a torn result file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _log_eval(run_id: str, report: Any, grid: Any, variant: Any, seed: int, cfg: Any) -> None:
    """Eval scores, grid and report into the variant's MLflow training run."""
    import mlflow

    from lidit.experiment import report_metrics

    client = mlflow.MlflowClient()
    for key, value in report_metrics(report.to_dict()).items():
        if value is not None:
            client.log_metric(run_id, f"eval.{key}", float(value), step=cfg.steps)
    for key, value in {"experiment": cfg.name, "variant": variant.name, "seed": str(seed)}.items():
        client.set_tag(run_id, f"lidit.experiment.{key}", value)
    client.log_dict(run_id, report.to_dict(), "eval/report.json")
    if grid is not None:
        client.log_image(run_id, grid, artifact_file="eval/grid.png")


def train_variant(cfg: Any, variant: Any, seed: int, overrides: list[str], work: Path) -> dict[str, Any]:
    """Train one (variant, seed) through the training stage; fetch its exported EMA pipeline from MLflow."""
    import mlflow

    from lidit.config import load_config
    from lidit.registry import PIPELINE_ARTIFACT, find_pipeline_dir
    from training.config import TrainConfig
    from training.train import run_training

    trained = run_training(load_config(TrainConfig, cfg.train_config, overrides))
    local = mlflow.artifacts.download_artifacts(
        run_id=trained["mlflow_run_id"],
        artifact_path=PIPELINE_ARTIFACT,
        dst_path=str(work / "pipelines" / run_name(cfg, variant, seed)),
    )
    return {
        "variant": variant.name,
        "seed": seed,
        "final_loss": trained["final_loss"],
        # A rung killed after its training finished gets the run back as it is: its time is the run's own.
        "train_seconds": trained["run_seconds"] if trained["already_finished"] else trained["seconds"],
        "mlflow_run_id": trained["mlflow_run_id"],
        "pipeline": str(find_pipeline_dir(local)),  # under artifacts/pipeline/ of the pyfunc model dir
        "train_overrides": overrides,
        "steps": trained["steps"],
    }


def score_variant(
    cfg: Any, variant: Any, seed: int, trained: dict[str, Any], work: Path, prompts: list, size: int
) -> dict[str, Any]:
    """Score a trained (variant, seed) on the held-out prompts; log the scores into its MLflow run."""
    from lidit.experiment import evaluate_pipeline
    from lidit.images import make_grid
    from lidit.pipeline import LiDiTPipeline

    t0 = time.perf_counter()
    pipe = LiDiTPipeline.from_pretrained(trained["pipeline"])
    report, images = evaluate_pipeline(pipe, prompts, cfg.eval, size=size)
    grid = make_grid(images[: cfg.eval.grid], cols=8) if cfg.eval.grid else None
    if grid is not None:
        (work / "grids").mkdir(parents=True, exist_ok=True)
        grid.save(work / "grids" / f"{variant.name}-s{seed}.png")
    _log_eval(trained["mlflow_run_id"], report, grid, variant, seed, cfg)
    return {
        **trained,
        "eval": report.to_dict(),
        "eval_settings": cfg.eval.model_dump(),
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_report(summary: dict[str, Any], results_dir: Path, work: Path) -> dict[str, str]:
    """results_dir/ladder.{md,json} + by-position plot + one grid of every variant's first images."""
    from PIL import Image

    from lidit.experiment import markdown_table, plot_by_position
    from lidit.images import make_grid

    results_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_by_position(summary, results_dir / f"{REPORT_NAME}_by_position.png")
    rows = []
    for v in summary["variants"]:
        if v["seeds"]:
            path = work / "grids" / f"{v['name']}-s{v['seeds'][0]}.png"
            if path.is_file():
                with Image.open(path) as im:
                    rows.append(_labelled(im.convert("RGB"), f"{v['name']} (seed {v['seeds'][0]})"))
    grids = None
    if rows:  # same eval settings for every variant: the rows have one size
        grids = results_dir / f"{REPORT_NAME}_samples.png"
        make_grid(rows, cols=1, pad=4).save(grids)
    m = summary["machine"]
    budget = summary["budget"]
    header = [
        f"# {summary['experiment']}",
        "",
        f"- command: `{summary['command']}`",
        f"- machine: {m['cpus']} CPUs ({m['processor']}), {m['platform']}, Python {m['python']}, torch {m['torch']}",
        f"- wall time: {summary['seconds']['total']:.0f} s (cache {summary['seconds']['cache']:.0f} s, "
        f"variants {summary['seconds']['variants']:.0f} s)",
        f"- shared budget per variant and seed: {budget['steps']} steps x batch {budget['batch_size']} "
        f"({budget['steps'] * budget['batch_size']} samples), seeds {budget['seeds']}",
        f"- scored on the first {summary['eval']['prompts']} held-out prompts (colour-shape-relation "
        f"combinations never seen in training), {summary['eval']['sample_steps']} sampler steps, "
        f"guidance {summary['eval']['guidance_scale']}",
        "- cells: mean ± sample std over seeds; `overall` = every object with exact count, colour and shape "
        "and the relation right; `1st/2nd/3rd third` = object accuracy by where it is named in the prompt",
        "",
    ]
    md = results_dir / f"{REPORT_NAME}.md"
    md.write_text("\n".join(header) + "\n" + markdown_table(summary))
    js = results_dir / f"{REPORT_NAME}.json"
    _write_json(js, summary)
    out = {"markdown": str(md), "json": str(js), "plot": str(plot)}
    if grids:
        out["samples"] = str(grids)
    return out


def _labelled(im: Any, label: str, margin: int = 150) -> Any:
    """`im` with `label` written in a white column on its left."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (im.width + margin, im.height), "white")
    canvas.paste(im, (margin, 0))
    ImageDraw.Draw(canvas).text((4, im.height // 2 - 6), label, fill="black")
    return canvas


def run_experiment(
    cfg: Any, results_dir: Path | None = None, command: list[str] | None = None
) -> dict[str, Any]:
    """Run (or continue) an experiment; returns the summary with the report paths."""
    # Read by every training worker; workers inherit the environment of the Ray this process starts.
    os.environ["LIDIT_TRAIN_THREADS"] = str(cfg.train_threads)
    import ray

    from cluster import ensure_ray
    from lidit.cache.reader import CacheReader
    from lidit.config import lidit_home
    from lidit.experiment import reference_metrics, summarize
    from lidit.registry import configure_mlflow
    from lidit.starter import build_starter, iter_split
    from pipelines.build import build_cache

    t_all = time.perf_counter()
    home = lidit_home()
    work = Path(cfg.work_dir or home / "experiments" / cfg.name).resolve()
    results_dir = (results_dir or work / "report").resolve()
    _log(f"{cfg.name}: {len(cfg.variants)} variants x {len(cfg.seeds)} seeds, work dir {work}")
    assets = build_starter(cfg.starter or home / "starter", preset=cfg.starter_preset, progress=True)
    configure_mlflow(cfg.name)  # before Ray starts, so training workers inherit the tracking URI
    started = ensure_ray()  # $RAY_ADDRESS's cluster, else a private local one (cluster's sizing rule)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    try:
        t0 = time.perf_counter()
        cache_cfg = ladder_cache_config(cfg, assets, Path(cfg.cache_dir) if cfg.cache_dir else work / "cache")
        _log(f"feature cache with encoders {[e.name for e in cache_cfg.encoders]} at {cache_cfg.output}")
        cache = build_cache(cache_cfg)
        cache_seconds = time.perf_counter() - t0
        reader = CacheReader(cache["uri"])
        heldout = list(iter_split(assets, "heldout", cfg.eval.prompts))  # one read: prompts and references
        prompts = [(r["caption"], r["spec"]) for r in heldout]
        references = reference_metrics([(r["image"], r["spec"], r["caption"]) for r in heldout])
        size = reader.manifest.image.resolution
        t0 = time.perf_counter()
        todo = [(v, s) for v in cfg.variants for s in cfg.seeds]
        for i, (variant, seed) in enumerate(todo, 1):
            file = work / "results" / variant.name / f"seed{seed}.json"
            overrides = train_overrides(cfg, variant, seed, cache["uri"], work / "runs")
            where = f"[{i}/{len(todo)}] {variant.name} seed {seed}"
            data = data_key(reader, variant)
            if file.is_file():
                result = load_result(file, overrides, data)
                if result.get("eval_settings") == cfg.eval.model_dump():
                    _log(f"{where}: done earlier, reusing {file}")
                    results.setdefault(variant.name, {})[seed] = result
                    continue
                _log(f"{where}: trained earlier, eval settings changed: scoring again")
            else:
                _log(f"{where}: training {cfg.steps} steps x {cfg.batch_size} on {variant.encoders}")
                result = {**train_variant(cfg, variant, seed, overrides, work), "data": data}
                _write_json(file, result)  # trained, not yet scored: a kill now costs no retraining
            result = score_variant(cfg, variant, seed, result, work, prompts, size)
            _write_json(file, result)
            results.setdefault(variant.name, {})[seed] = result
            _log(
                f"{where}: overall {result['eval']['overall']:.3f}, "
                f"train {result['train_seconds']:.0f} s, eval {result['eval_seconds']:.0f} s"
            )
        variants_seconds = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    summary = summarize(cfg, results)
    summary.update(
        references=references,
        command=" ".join(command or ["lidit", "experiment", "run"]),
        machine=machine(),
        cache={"uri": cache["uri"], "version": cache.get("version"), "rows": cache.get("rows")},
        seconds={
            "total": round(time.perf_counter() - t_all, 1),
            "cache": round(cache_seconds, 1),
            "variants": round(variants_seconds, 1),
        },
    )
    summary["report"] = write_report(summary, results_dir, work)
    _log_summary_run(cfg, summary)
    _log(f"report: {summary['report']['markdown']}")
    return summary


def _log_summary_run(cfg: Any, summary: dict[str, Any]) -> None:
    """One MLflow run per experiment invocation holding the table, the JSON and the plots."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.name)
    run = client.create_run(
        exp.experiment_id, run_name=f"{cfg.name}-summary", tags={"lidit.experiment.summary": "1"}
    )
    for key in ("markdown", "json", "plot", "samples"):
        if key in summary["report"]:
            client.log_artifact(run.info.run_id, summary["report"][key], artifact_path="report")
    client.set_terminated(run.info.run_id)
    summary["mlflow_summary_run_id"] = run.info.run_id
