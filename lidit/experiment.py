"""Ablation experiments on the starter set (the LI-DiT ladder): config, evaluation, aggregation, report.

An experiment trains several *variants* (encoders, instruction on/off, refiner depth, causal mask, fusion) with
one shared budget (same steps, batch and data) over several seeds, scores each trained pipeline with the
compositional evaluator on held-out prompts, and aggregates mean and spread across seeds. This module is the
Ray-free part: the schema of the experiment YAML, scoring a pipeline, the summary, the markdown table and the
plot. `lidit experiment run` (the front package) builds the cache, trains through the training stage and calls
these functions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lidit.config import StrictModel
from lidit.starter.evaluator import CATEGORIES, POSITION_BINS, EvalReport, score_image

# Training keys the runner owns: every variant gets the same budget, data and a run name of its own.
SHARED_KEYS = frozenset(
    {"steps", "batch_size", "seed", "name", "cache", "cache_version", "storage_path", "model.encoders"}
)


class LadderEncoder(StrictModel):
    """One cache encoder of the experiment: a starter LM read with or without the usage instruction."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    lm: Literal["llama", "qwen2"] = Field(description="which starter LM (lm_llama / lm_qwen2)")
    instruction: bool = Field(True, description="False: no instruction before the prompt (ablation)")


class Variant(StrictModel):
    """One rung of the ladder: which encoders feed the generator, plus training overrides."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="also part of the training run's name")
    label: str = Field("", description="short human description for the table")
    encoders: list[str] = Field(min_length=1)
    set: list[str] = Field(
        default_factory=list, description="training overrides, `key=value` as in `lidit train --set`"
    )
    paper: str | None = Field(None, description="the paper's number for this rung, for the table")

    @model_validator(mode="after")
    def _check(self) -> Variant:
        check_not_shared(self.set, f"variant {self.name!r}")
        return self


def check_not_shared(overrides: list[str], where: str) -> None:
    """Refuse training overrides of the keys the runner owns (they would be silently replaced)."""
    for pair in overrides:
        key = pair.split("=", 1)[0].strip()
        if key in SHARED_KEYS:
            raise ValueError(
                f"{where} overrides {key!r}: the budget and run identity are set by the experiment "
                f"(`steps`, `batch_size`, `seeds`), the same for every variant"
            )


class EvalSection(StrictModel):
    """How each trained variant is scored: held-out prompts, sampler settings."""

    prompts: int = Field(200, ge=1, description="first N held-out prompts (unseen combinations)")
    sample_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(4.0, ge=1.0)
    batch_size: int = Field(50, ge=1)
    seed: int = Field(0, description="image k of the prompt list uses noise seed `seed + k`")
    grid: int = Field(16, ge=0, description="images of the first prompts put in the variant's grid")


class ExperimentConfig(StrictModel):
    """An ablation experiment (the YAML `lidit experiment run` reads)."""

    name: str = Field("ablation-ladder", pattern=r"^[A-Za-z0-9_.-]+$")
    starter: str | None = Field(None, description="starter directory (default: $LIDIT_HOME/starter)")
    starter_preset: Literal["default", "micro"] = "default"
    work_dir: str | None = Field(
        None, description="runs, cache, images (default: $LIDIT_HOME/experiments/NAME)"
    )
    cache_dir: str | None = Field(None, description="feature cache location (default: WORK_DIR/cache)")
    cache_config: str = Field(
        description="cache build YAML for stage settings; sources/encoders come from here"
    )
    cache_set: list[str] = Field(default_factory=list, description="cache build overrides")
    train_config: str = Field(description="base training YAML shared by every variant")
    train_set: list[str] = Field(default_factory=list, description="training overrides for every variant")
    train_threads: int = Field(1, ge=1, description="torch threads per training worker")
    steps: int = Field(ge=1, description="the shared budget: optimizer steps per variant and seed")
    batch_size: int = Field(ge=1, description="the shared budget: global batch size")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    encoders: list[LadderEncoder] = Field(min_length=1)
    variants: list[Variant] = Field(min_length=1)
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [e.name for e in self.encoders]
        if len(set(names)) != len(names):
            raise ValueError(f"encoder names must be unique, got {names}")
        variants = [v.name for v in self.variants]
        if len(set(variants)) != len(variants):
            raise ValueError(f"variant names must be unique, got {variants}")
        for v in self.variants:
            unknown = [e for e in v.encoders if e not in names]
            if unknown:
                raise ValueError(f"variant {v.name!r} uses encoders {unknown} not in encoders {names}")
        check_not_shared(self.train_set, "train_set")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be unique, got {self.seeds}")
        return self

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r}; variants are {[v.name for v in self.variants]}")


# -- scoring -----------------------------------------------------------------------------------------------


def evaluate_pipeline(
    pipe: Any,
    prompts: list[tuple[str, dict[str, Any]]],
    settings: EvalSection,
    size: int = 64,
) -> tuple[EvalReport, list[Any]]:
    """Generate one image per `(prompt, spec)` with a `LiDiTPipeline` and score it; returns (report, images).

    Image k uses noise seed `settings.seed + k` whatever the batching, so variants see the same noise.
    """
    from lidit.starter.evaluator import aggregate

    images, scores = [], []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start : start + settings.batch_size]
        batch = pipe(
            [p for p, _ in chunk],
            num_inference_steps=settings.sample_steps,
            guidance_scale=settings.guidance_scale,
            seed=settings.seed + start,
            height=size,
            width=size,
        )
        for image, (prompt, spec) in zip(batch, chunk, strict=True):
            scores.append(score_image(image, spec, prompt))
            images.append(image)
    return aggregate(scores), images


def reference_metrics(items: list[tuple[Any, dict[str, Any], str]]) -> dict[str, dict[str, float | None]]:
    """Flat metrics of the real `(image, spec, prompt)` held-out items scored against their own prompts (the
    ceiling of any generator) and against other items' prompts (what an image that ignores its prompt gets)."""
    from lidit.starter.evaluator import control_reports, score_images

    return {
        "real images, own prompts (ceiling)": report_metrics(score_images(items).to_dict()),
        "real images, shuffled prompts (chance)": report_metrics(
            control_reports(items)["shuffled_prompts"].to_dict()
        ),
    }


# -- aggregation -------------------------------------------------------------------------------------------

METRICS: tuple[str, ...] = (
    ("overall", "category_mean")
    + tuple(f"cat.{c}" for c in CATEGORIES)
    + tuple(f"pos.{b}" for b in POSITION_BINS)
)


def report_metrics(report: dict[str, Any]) -> dict[str, float | None]:
    """Flat metrics of one `EvalReport.to_dict()`: overall, mean of the categories, each category, each
    position bin, the relation direction where both objects were found (None where nothing applied)."""
    cats = {c: (report["categories"].get(c) or {}).get("acc") for c in CATEGORIES}
    present = [v for v in cats.values() if v is not None]
    out: dict[str, float | None] = {
        "overall": report["overall"],
        "category_mean": sum(present) / len(present) if present else None,
    }
    out.update({f"cat.{c}": v for c, v in cats.items()})
    out.update({f"pos.{b}": (report["by_position"].get(b) or {}).get("acc") for b in POSITION_BINS})
    direction = report.get("relation_direction") or {}
    out.update({f"rel.{d}": (direction.get(d) or {}).get("acc") for d in ("holds", "inverse")})
    return out


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (0 for one value) of the non-missing values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals)}


def summarize(config: ExperimentConfig, results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """`results[variant][seed]` = {"eval": EvalReport dict, ...} -> per variant, per metric mean/std over seeds.

    Variants keep the config's order; a variant with no finished seed is listed with `seeds: []`.
    """
    variants = []
    for v in config.variants:
        per_seed = results.get(v.name, {})
        seeds = sorted(per_seed)
        flat = [report_metrics(per_seed[s]["eval"]) for s in seeds]
        variants.append(
            {
                "name": v.name,
                "label": v.label,
                "encoders": v.encoders,
                "set": v.set,
                "paper": v.paper,
                "seeds": seeds,
                "per_seed": {str(s): m for s, m in zip(seeds, flat, strict=True)},
                "metrics": {k: mean_std([m[k] for m in flat]) for k in METRICS},
                "n_images": sum(per_seed[s]["eval"]["n_images"] for s in seeds),
                "train_seconds": sum(per_seed[s].get("train_seconds", 0.0) for s in seeds),
                "final_loss": mean_std([per_seed[s].get("final_loss") for s in seeds]),
            }
        )
    return {
        "experiment": config.name,
        "budget": {"steps": config.steps, "batch_size": config.batch_size, "seeds": config.seeds},
        "eval": config.eval.model_dump(),
        "metrics": list(METRICS),
        "variants": variants,
    }


# -- report ------------------------------------------------------------------------------------------------

_COLUMNS = (
    ("overall", "overall"),
    ("category_mean", "cat. mean"),
    ("cat.colour", "colour"),
    ("cat.shape", "shape"),
    ("cat.binding", "binding"),
    ("cat.count", "count"),
    ("cat.position", "position"),
    ("pos.first", "1st third"),
    ("pos.middle", "2nd third"),
    ("pos.last", "3rd third"),
)


def _cell(m: dict[str, Any]) -> str:
    if m["mean"] is None:
        return "n/a"
    return f"{m['mean']:.3f} ± {m['std']:.3f}" if m["n"] > 1 else f"{m['mean']:.3f}"


def markdown_table(summary: dict[str, Any]) -> str:
    """The results table: one row per variant, mean ± sample std over seeds for every metric."""
    head = ["variant", "encoders", "seeds", *(title for _, title in _COLUMNS), "final loss", "paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in summary["variants"]:
        row = [
            f"`{v['name']}`" + (f" {v['label']}" if v["label"] else ""),
            ", ".join(v["encoders"]),
            str(len(v["seeds"])),
            *(_cell(v["metrics"][key]) for key, _ in _COLUMNS),
            _cell(v["final_loss"]),
            v["paper"] or "",
        ]
        lines.append("| " + " | ".join(row) + " |")
    for name, metrics in summary.get("references", {}).items():
        cells = [_cell({"mean": metrics[key], "std": 0.0, "n": 1}) for key, _ in _COLUMNS]
        lines.append("| " + " | ".join([f"*{name}*", "-", "-", *cells, "-", ""]) + " |")
    return "\n".join(lines) + "\n"


def plot_by_position(summary: dict[str, Any], path: str | Path) -> Path:
    """Accuracy of objects by where they are named in the prompt (thirds), one line per variant, seed spread
    as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = list(range(len(POSITION_BINS)))
    for i, v in enumerate(summary["variants"]):
        stats = [v["metrics"][f"pos.{b}"] for b in POSITION_BINS]
        if all(s["mean"] is None for s in stats):
            continue
        means = [s["mean"] if s["mean"] is not None else float("nan") for s in stats]
        errs = [s["std"] or 0.0 for s in stats]
        offset = (i - len(summary["variants"]) / 2) * 0.015  # keep overlapping error bars readable
        ax.errorbar([xi + offset for xi in x], means, yerr=errs, marker="o", capsize=3, label=v["name"])
    ax.set_xticks(x, [f"{b} third" for b in POSITION_BINS])
    ax.set_xlabel("where the object is named in the prompt")
    ax.set_ylabel("object accuracy (exact count, colour, shape)")
    budget = summary["budget"]
    ax.set_title(
        f"{summary['experiment']}: {budget['steps']} steps x {budget['batch_size']}, "
        f"{len(budget['seeds'])} seed(s)"
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
