"""Learning curve of a training recipe: does the model follow the prompt, and how fast?

    python benchmarks/learning_curve.py                                   # the starter recipe
    python benchmarks/learning_curve.py --recipe long                     # configs/starter/train_long.yaml
    python benchmarks/learning_curve.py --config my.yaml --budgets 500,1000 --set optim.lr=2e-3
    python benchmarks/learning_curve.py --recipe long --rescore DIR       # score a --save run again

Trains one run of the recipe (its YAML: steps, batch, model, optim) in a bare single-process loop of the real
train step (`training.step.train_step`) on the real loader (`training.data.bucketed_batches`) over the
starter cache, and at each step budget scores the EMA weights:

- held-out prompts (colour-shape-relation combinations never seen in training) and training prompts, each
  generated with `LiDiTPipeline` and scored per category by the compositional evaluator;
- the loss on a fixed batch of training rows with the true text, with the text of other rows (shuffled) and
  with no text, at fixed noise: the gap between them is how much the model uses the text.

Budgets are points along one run (the cosine schedule spans the recipe's `steps`), so the last row is exactly
the recipe; earlier rows are that run's EMA weights at that step. Rows merge into
`benchmarks/results/learning_curve.{md,json}` by recipe, so reruns of one recipe keep the others. Ray-free
(torch + lidit + the training step), so the same command runs on a GPU box (`--device cuda`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lidit.cache.reader import CacheReader, batch_to_training_inputs
from lidit.config import ConfigError, lidit_home, load_config
from lidit.encoder import EncoderConfig, PromptEncoder
from lidit.experiment import EvalSection, evaluate_pipeline, report_metrics
from lidit.generator import LiDiTGenerator, TextFeatures
from lidit.objectives import flow_targets, training_targets
from lidit.pipeline import LiDiTPipeline
from lidit.starter import heldout_prompts, iter_split
from lidit.starter.captions import swap_attribute_words, swap_relation_words
from training.config import TrainConfig
from training.data import bucketed_batches, head_rows
from training.loop import (
    batch_extras,
    build_generator_config,
    select_branches,
    select_layout,
    select_negatives,
)
from training.parallelize import wrap_single_worker
from training.state import EMA
from training.step import build_optimizer, step_generator, train_step
from training.train import check_against_cache

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RECIPES = {
    "default": ROOT / "configs/starter/train.yaml",
    "long": ROOT / "configs/starter/train_long.yaml",
    "long-layout": ROOT / "configs/starter/train_long_layout.yaml",
}
PROGRESS_EVERY = 100  # steps between progress lines
CATEGORIES = ("overall", "colour", "shape", "binding", "count", "position")
DIRECTIONS = ("rel_holds", "rel_inverse")  # relation scenes with both objects found


def _shuffled(texts: list[TextFeatures]) -> list[TextFeatures]:
    """Every row gets the next row's text (a rotation moves every prompt to another image)."""
    return [TextFeatures(t.states.roll(1, 0), t.mask.roll(1, 0), t.prefix_len) for t in texts]


@torch.no_grad()
def text_losses(
    model: LiDiTGenerator, cfg: TrainConfig, latents: torch.Tensor, texts: list[TextFeatures]
) -> dict:
    """Loss on one fixed batch at fixed noise with the true, shuffled and no text."""
    g = torch.Generator().manual_seed(1234)
    t = training_targets(cfg.model.objective, latents, g, cfg.model.flow_shift, cfg.model.timestep_sampling)
    none = [x.drop_prompt(torch.ones(latents.shape[0], dtype=torch.bool)) for x in texts]
    out = {}
    for name, tx in (("true", texts), ("shuffled", _shuffled(texts)), ("none", none)):
        out[f"loss_{name}"] = round(float(F.mse_loss(model(t.noisy, t.timesteps, tx), t.target)), 5)
    return out


def reference_rows(starter: Path, vae_path: str, n: int) -> dict[str, dict[str, float | None]]:
    """What the evaluator gives real held-out images (the ceiling), their VAE round trips (the ceiling of a
    generator decoding through this VAE), and controls that ignore the prompt (near 0; shuffled: chance)."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    from lidit.starter.evaluator import control_reports, score_images
    from lidit.starter.vae import reconstruct

    rows = list(iter_split(starter, "heldout", limit=n))
    items = [(r["image"], r["spec"], r["caption"]) for r in rows]
    vae = AutoencoderKL.from_pretrained(vae_path).eval()
    recon = reconstruct(vae, np.stack([np.asarray(im) for im, _, _ in items]))
    reports = {
        "real images, own prompts": score_images(items),
        "VAE reconstructions, own prompts": score_images(
            (Image.fromarray(r), spec, p) for r, (_, spec, p) in zip(recon, items, strict=True)
        ),
        **{f"control: {k}": v for k, v in control_reports(items).items()},
    }
    out = {}
    for name, report in reports.items():
        m = report_metrics(report.to_dict())
        out[name] = {k: m["overall" if k == "overall" else f"cat.{k}"] for k in CATEGORIES}
    return out


def train_prompts(starter: Path, n: int) -> list[tuple[str, dict[str, Any]]]:
    return [(r["caption"], r["spec"]) for r in iter_split(starter, "train", limit=n, decode=False)]


def sampling_parts(reader: CacheReader, names: list[str], device: str) -> tuple[Any, list[PromptEncoder]]:
    """The cache's VAE and prompt encoders (the models its features came from), for a `LiDiTPipeline`."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(reader.vae_path).to(device)
    return vae, [PromptEncoder(EncoderConfig.model_validate(reader.encoder_config(n)), device) for n in names]


# Noise levels of each caption preference. Relations: high, where sampling still decides the layout (below ~0.7
# the noisy input shows where the objects are, so any caption predicts about the same). Shape and colour words:
# mid, where objects are placed but not yet drawn (a `long` model at 10000 steps: the loss gap under
# shape-swapped captions peaks at sigma 0.6-0.8; near 1 nothing is placed yet, so shapes barely matter).
PREFERENCE_SIGMAS = {"relation": (0.8, 0.9, 0.97), "shape": (0.6, 0.75, 0.9), "colour": (0.6, 0.75, 0.9)}
PREFERENCE_ITEMS = {"relation": (500, 300), "shape": (200, 200), "colour": (200, 200)}  # held-out, train


def swapped_items(starter: Path, split: str, n: int, words: str) -> list[tuple[Any, str, str]]:
    """(image, caption, caption with its `words` swapped) of the first `n` scenes of a split that have such
    words: relation scenes for "relation" (the relation said the other way round), any scene for "shape" /
    "colour" (`swap_attribute_words`)."""
    out = []
    for row in iter_split(starter, split):
        if words == "relation":
            if not row["spec"].get("relation"):
                continue
            swapped = swap_relation_words(row["caption"])
        else:
            swapped = swap_attribute_words(row["caption"], words)
        out.append((row["image"], row["caption"], swapped))
        if len(out) == n:
            break
    return out


@torch.no_grad()
def caption_preference(
    model: LiDiTGenerator,
    cfg: TrainConfig,
    parts: tuple[Any, list[PromptEncoder]],
    items: list[tuple[Any, str, str]],
    device: str,
    sigmas: tuple[float, ...],
) -> float | None:
    """Share of images denoised better under their own caption than under the swapped one (`swapped_items`),
    at fixed noise, summed over `sigmas`: 1 = the swapped words matter as the caption says, 0.5 = they are
    ignored, below 0.5 = the model prefers the other words (for relations on held-out images: the side the
    training data put those objects on). It needs no object drawn right, so it reads before the evaluator
    does. Flow only (None otherwise)."""
    import numpy as np

    from lidit.pipeline import vae_to_latents
    from lidit.starter.vae import to_tensor

    if cfg.model.objective != "flow" or not items:
        return None
    vae, encoders = parts
    images = to_tensor(np.stack([np.asarray(im) for im, _, _ in items])).to(device)
    x0 = vae_to_latents(vae.encode(images).latent_dist.mean, vae).float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4321)).to(device)
    totals = []
    for column in (1, 2):  # own caption, swapped
        texts = [e.features([item[column] for item in items]) for e in encoders]
        total = torch.zeros(len(items), device=device)
        for sigma in sigmas:
            flow = flow_targets(x0, noise, torch.full((len(items),), sigma, device=device))
            total += (
                (model(flow.noisy, flow.timesteps, texts).float() - flow.target).square().flatten(1).mean(1)
            )
        totals.append(total)
    return round(float((totals[0] < totals[1]).float().mean()), 4)


def category_scores(report: Any) -> dict[str, float | None]:
    """Overall and per-category accuracy of an `EvalReport`, keyed by `CATEGORIES`, plus `rel_holds` /
    `rel_inverse`: of the relation scenes with both objects found, the share placed right / the other way round."""
    metrics = report_metrics(report.to_dict())
    scores = {k: metrics["overall" if k == "overall" else f"cat.{k}"] for k in CATEGORIES}
    return scores | {k: metrics[k.replace("_", ".")] for k in DIRECTIONS}


def run_curve(
    cfg: TrainConfig,
    budgets: list[int],
    starter: Path,
    eval_cfg: EvalSection,
    device: str,
    on_row: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
    save_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Train `cfg` once, scoring at every budget; `on_row(rows)` after each budget, so a long run keeps
    the rows it finished. With `save_dir`, the EMA generator of each budget is saved as `save_dir/step_N`
    (to re-score it with other sampler settings without training again)."""
    reader = CacheReader(cfg.cache, version=cfg.cache_version)
    try:  # the checks `lidit train` makes: layout targets or negatives the recipe needs, encoders, batch fill
        check_against_cache(cfg, reader)
    except ConfigError as exc:
        raise SystemExit(f"{reader.uri}: {exc}") from None
    names = cfg.model.encoders or reader.encoder_names
    gen_config = build_generator_config(cfg, reader)
    torch.manual_seed(cfg.seed)
    model = LiDiTGenerator(gen_config).to(device)
    wrap_single_worker(model, cfg.scale)
    optim = build_optimizer(model, cfg)
    ema = EMA(model, cfg.optim.ema_decay)
    batches = bucketed_batches(reader, cfg.batch_size, 0, 1, cfg.seed, **batch_extras(cfg))
    fixed = head_rows(reader, 64)
    fixed_latents, fixed_texts, _ = batch_to_training_inputs(fixed, reader)
    fixed_texts = select_branches(fixed_texts, reader, names)

    vae, encoders = sampling_parts(reader, names, device)
    heldout = heldout_prompts(starter, eval_cfg.prompts)
    seen = train_prompts(starter, eval_cfg.prompts)
    preference_sets = preference_items(starter)
    size = reader.manifest.image.resolution

    rows, trained_s, done = [], 0.0, 0
    for budget in sorted(budgets):
        t0 = time.perf_counter()
        for step in range(done, budget):
            batch = next(batches)
            texts = select_branches(batch.texts, reader, names)
            hard = select_negatives(batch.negatives, reader, names)
            layout = select_layout(batch.layout, reader, names)
            draws = step_generator(cfg.seed, 0, step)
            train_step(model, optim, ema, batch.latents, texts, cfg, step, draws, device, hard, layout)
            if (step + 1) % PROGRESS_EVERY == 0:
                elapsed = time.perf_counter() - t0
                eta = elapsed / (step + 1 - done) * (budget - step - 1)
                print(
                    f"[curve] step {step + 1}/{cfg.steps}  {elapsed:.0f}s  next score at {budget}"
                    f" in ~{eta:.0f}s",
                    flush=True,
                )
        if device != "cpu":
            torch.cuda.synchronize()
        segment_s = time.perf_counter() - t0
        trained_s += segment_s
        samples = (budget - done) * cfg.batch_size
        done = budget

        t0 = time.perf_counter()
        generator = LiDiTGenerator(gen_config)
        generator.load_state_dict(ema.full_state_dict(), strict=True)
        generator.to(device).eval()
        if save_dir is not None:
            generator.save_pretrained(save_dir / f"step_{budget}")
        row: dict[str, Any] = {
            "steps": budget,
            "samples": budget * cfg.batch_size,
            "train_s": round(trained_s, 1),
            "samples_per_s": round(samples / max(segment_s, 1e-9), 1),
        }
        row.update(text_losses(generator, cfg, fixed_latents.to(device), [t.to(device) for t in fixed_texts]))
        row.update(
            score_splits(
                generator, cfg, (vae, encoders), {"heldout": heldout, "train": seen}, eval_cfg, size, device
            )
        )
        row.update(preferences(generator, cfg, (vae, encoders), preference_sets, device))
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        on_row(rows)
    return rows


def preference_items(starter: Path) -> dict[str, dict[str, list[tuple[Any, str, str]]]]:
    """What `caption_preference` reads per kind of swapped words and split (`PREFERENCE_ITEMS`): for relations
    every held-out relation scene (500 held-out images hold ~300) and 300 training ones."""
    return {
        words: {
            "heldout": swapped_items(starter, "heldout", heldout, words),
            "train": swapped_items(starter, "train", train, words),
        }
        for words, (heldout, train) in PREFERENCE_ITEMS.items()
    }


def preferences(
    generator: LiDiTGenerator,
    cfg: TrainConfig,
    parts: tuple[Any, list[PromptEncoder]],
    items: dict[str, dict[str, list[tuple[Any, str, str]]]],
    device: str,
) -> dict[str, dict[str, float | None]]:
    """Row fields `relation_preference`, `shape_preference`, `colour_preference`: {split: share}."""
    return {
        f"{words}_preference": {
            split: caption_preference(generator, cfg, parts, its, device, PREFERENCE_SIGMAS[words])
            for split, its in splits.items()
        }
        for words, splits in items.items()
    }


def score_splits(
    generator: LiDiTGenerator,
    cfg: TrainConfig,
    parts: tuple[Any, list[PromptEncoder]],
    splits: dict[str, list[tuple[str, dict[str, Any]]]],
    eval_cfg: EvalSection,
    size: int,
    device: str,
) -> dict[str, dict[str, float | None]]:
    """`category_scores` of each split's prompts generated by `generator` (noise seeded per prompt)."""
    vae, encoders = parts
    pipe = LiDiTPipeline(
        generator, vae, cfg.model.objective, encoders, device=device, flow_shift=cfg.model.flow_shift
    )
    return {
        split: category_scores(evaluate_pipeline(pipe, prompts, eval_cfg, size)[0])
        for split, prompts in splits.items()
    }


def rescore(
    cfg: TrainConfig,
    rows: list[dict[str, Any]],
    saved: Path,
    starter: Path,
    eval_cfg: EvalSection,
    device: str,
) -> list[str]:
    """Score the generators a run saved (`--save`: saved/step_N) again, with the evaluator as it is now, into
    their rows (training untouched; losses and timings kept). Returns the categories whose score changed."""
    reader = CacheReader(cfg.cache, version=cfg.cache_version)
    parts = sampling_parts(reader, cfg.model.encoders or reader.encoder_names, device)
    splits = {
        "heldout": heldout_prompts(starter, eval_cfg.prompts),
        "train": train_prompts(starter, eval_cfg.prompts),
    }
    preference_sets = preference_items(starter)
    changed = []
    for row in rows:
        folder = saved / f"step_{row['steps']}"
        if not folder.is_dir():
            raise SystemExit(f"--rescore: no saved generator {folder} for the row at {row['steps']} steps")
        generator = LiDiTGenerator.from_pretrained(folder, device=device).eval()
        size = reader.manifest.image.resolution
        scores = score_splits(generator, cfg, parts, splits, eval_cfg, size, device)
        for split, new in scores.items():
            changed += [f"{row['steps']}/{split}/{k}" for k, v in row[split].items() if new.get(k) != v]
            row[split] = new
        prefs = preferences(generator, cfg, parts, preference_sets, device)
        row.update(prefs)
        print(json.dumps({"steps": row["steps"], **scores, **prefs}), flush=True)
    return changed


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Learning curve",
        "",
        "`python benchmarks/learning_curve.py [--recipe long]`: one bare-loop run of the recipe (the real train step",
        "and loader), EMA weights scored at each step budget. Held-out = colour-shape-relation combinations never",
        "seen in training; train = prompts of training images. Loss columns: fixed batch of 64 training rows at",
        "fixed noise with the true text / another row's text / no text (a gap = the model uses the text).",
        "Hard-negative rows name `model.hard_negative_kind`: until stop 35 the curve encoded the negatives itself;",
        "now they are the cache's `negative_caption` column (`configs/starter/cache.yaml`: the starter's",
        "`shape_negative`), so rerun those rows without that key on a cache built with the wanted column.",
        "",
    ]
    for name, rec in results.items():
        m = rec["machine"]
        lines += [
            f"## Recipe `{name}` ({rec['config']})",
            "",
            f"{rec['recipe']}  ",
            f"Machine: {m['device']}, {m['threads']} threads, torch {m['torch']}; eval: {rec['eval']['prompts']} "
            f"prompts per split, {rec['eval']['sample_steps']} sampler steps, guidance {rec['eval']['guidance_scale']}; "
            f"measured {rec['date']}.",
            *([f"{rec['note']}  "] if rec.get("note") else []),
            *([f"Rescored from the saved generators {rec['rescored']}.  "] if rec.get("rescored") else []),
            "",
            "| steps | samples | train s | held-out overall | colour | shape | binding | count | position "
            "| rel. holds | inverted | train-prompt overall | colour | shape | binding | count | position "
            "| rel. holds | inverted | loss true | shuffled | none | rel. pref held-out | train "
            "| shape pref held-out | train | colour pref held-out | train |",
            "|" + "---|" * 28,
        ]
        for r in rec["rows"]:
            h, t = r["heldout"], r["train"]
            lines.append(
                f"| {r['steps']} | {r['samples']} | {r['train_s']:.0f} | "
                + " | ".join(fmt(h.get(k)) for k in (*CATEGORIES, *DIRECTIONS))
                + " | "
                + " | ".join(fmt(t.get(k)) for k in (*CATEGORIES, *DIRECTIONS))
                + f" | {r['loss_true']:.4f} | {r['loss_shuffled']:.4f} | {r['loss_none']:.4f} | "
                + " | ".join(
                    fmt((r.get(f"{words}_preference") or {}).get(split))
                    for words in PREFERENCE_SIGMAS
                    for split in ("heldout", "train")
                )
                + " |"
            )
        lines += [
            "",
            "rel. holds / inverted: of the relation scenes whose two named objects were both found, the share "
            "with the relation right / placed the other way round (n/a: rows measured before this column). "
            "rel. pref: share of relation images (all ~300 held-out ones; 300 training ones) denoised better "
            "under their caption than under it with the relation words swapped, at fixed noise levels 0.8-0.97 "
            "(1 = the words place the objects, 0.5 = ignored, below 0.5 = the other side preferred). "
            "shape / colour pref: the same on 200 held-out and 200 training images of any kind, their captions "
            "with every shape / colour word swapped for another, at noise 0.6-0.9 (n/a: rows measured before "
            "these columns).",
            "",
        ]
        ref = rec.get("reference") or {}
        if ref:
            lines += [
                f"Reference rows (the first {rec['eval']['prompts']} held-out images, same evaluator):",
                "",
                "| images | overall | colour | shape | binding | count | position |",
                "|---|---|---|---|---|---|---|",
            ]
            for name, r in ref.items():
                lines.append(f"| {name} | " + " | ".join(fmt(r[k]) for k in CATEGORIES) + " |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipe", default="default", help=f"one of {sorted(RECIPES)} (or a name with --config)"
    )
    parser.add_argument("--config", help="training YAML (default: the recipe's)")
    parser.add_argument("--budgets", help="comma-separated step budgets (default: quarters of `steps`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--starter", default=str(lidit_home() / "starter"))
    parser.add_argument("--prompts", type=int, default=100, help="prompts scored per split")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--note", help="a line kept with the recipe's rows (conditions of the measurement)")
    parser.add_argument("--save", help="save each budget's EMA generator under this folder (step_N)")
    parser.add_argument(
        "--rescore",
        metavar="DIR",
        help="no training: score the recipe's committed rows again from the generators a --save run left in DIR",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = Path(args.config) if args.config else RECIPES.get(args.recipe)
    if config is None:
        raise SystemExit(f"unknown recipe {args.recipe!r}: pass --config or one of {sorted(RECIPES)}")
    cfg = load_config(TrainConfig, config, args.overrides)
    budgets = (
        [int(b) for b in args.budgets.split(",")]
        if args.budgets
        else sorted({max(1, cfg.steps * k // 4) for k in (1, 2, 3, 4)})
    )
    if max(budgets) > cfg.steps:
        raise SystemExit(f"budget {max(budgets)} is past the recipe's {cfg.steps} steps")
    eval_cfg = EvalSection(prompts=args.prompts, guidance_scale=cfg.tracking.guidance_scale)
    started = time.perf_counter()
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "learning_curve.json"

    if args.rescore:
        results = json.loads(path.read_text()) if path.is_file() else {}
        if args.recipe not in results:
            raise SystemExit(f"--rescore: no rows of recipe {args.recipe!r} in {path}")
        rec = results[args.recipe]
        eval_cfg = EvalSection.model_validate(rec["eval"])
        changed = rescore(cfg, rec["rows"], Path(args.rescore), Path(args.starter), eval_cfg, args.device)
        rec["rescored"] = f"{time.strftime('%Y-%m-%d')}, changed: {', '.join(changed) or 'none'}"
        path.write_text(json.dumps(results, indent=2) + "\n")
        (out / "learning_curve.md").write_text(markdown(results))
        print(f"rescored {len(rec['rows'])} rows of {args.recipe!r}; changed: {changed or 'none'}")
        return

    reader = CacheReader(cfg.cache, version=cfg.cache_version)
    reference = reference_rows(Path(args.starter), reader.vae_path, args.prompts)

    def write(rows: list[dict[str, Any]]) -> None:
        """Merge this recipe's rows so far into the results (a long run keeps what it finished)."""
        results = json.loads(path.read_text()) if path.is_file() else {}
        results[args.recipe] = {
            "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
            "recipe": f"{cfg.steps} steps x batch {cfg.batch_size}, {cfg.model.preset} preset, "
            f"{cfg.model.objective} (shift {cfg.model.flow_shift}, {cfg.model.timestep_sampling} t), "
            f"lr {cfg.optim.lr}, EMA {cfg.optim.ema_decay}"
            + (f"; overrides {args.overrides}" if args.overrides else ""),
            "eval": eval_cfg.model_dump(),
            "machine": {
                "device": args.device if args.device != "cpu" else f"cpu ({os.cpu_count()} cores)",
                "threads": args.threads,
                "torch": torch.__version__,
            },
            "date": time.strftime("%Y-%m-%d"),
            "wall_s": round(time.perf_counter() - started, 1),
            **({"note": args.note} if args.note else {}),
            "reference": reference,
            "rows": rows,
        }
        path.write_text(json.dumps(results, indent=2) + "\n")
        (out / "learning_curve.md").write_text(markdown(results))

    save_dir = Path(args.save) if args.save else None
    run_curve(cfg, budgets, Path(args.starter), eval_cfg, args.device, on_row=write, save_dir=save_dir)
    print(f"wrote {path} and learning_curve.md")


if __name__ == "__main__":
    main()
