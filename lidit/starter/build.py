"""Build (or reuse) the starter assets: data, tokenizer, two tiny LMs, a tiny VAE and an evaluator check.

Layout of a built starter directory (names are a contract other stages read)::

    summary.json                     paths, sizes, fingerprints, quality numbers, config (written last)
    data/{train,heldout}/part-NNNNN.parquet   columns STARTER_COLUMNS (image = PNG bytes, spec and grounding = JSON,
                                     shape_ / relation_ / binding_negative = hard-negative captions of training rows)
    images/{train,heldout}/<id>.png + <id>.txt   the same rows as an image folder with caption files
    tokenizer/                       PreTrainedTokenizerFast (AutoTokenizer)
    lm_llama/, lm_qwen2/             save_pretrained causal LMs + tokenizer files (AutoModelForCausalLM)
    vae/                             save_pretrained AutoencoderKL; per-channel latents_mean / latents_std (diffusers'
                                     convention), so lidit.pipeline.vae_to_latents standardises every channel

Idempotent by stage: each stage has a key (its config plus the fingerprints of the stages it reads). A stage is
reused when the key in `summary.json` matches and its files still hash to the recorded fingerprint; otherwise it
is rebuilt in a temporary directory and swapped in. The summary is rewritten after every stage, so a killed build
resumes at the stage it was in.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lidit.config import dump_config
from lidit.fingerprint import hash_files
from lidit.starter.captions import binding_negative, caption_for, relation_negative, shape_negative
from lidit.starter.config import StarterConfig, config_hash, starter_config
from lidit.starter.evaluator import EvalReport, aggregate, control_reports, score_image
from lidit.starter.layout import relation_grounding
from lidit.starter.render import from_png, render, to_png
from lidit.starter.scenes import SPLITS, heldout_combos, sample_scenes

FORMAT_VERSION = 1
SUMMARY_FILE = "summary.json"
STARTER_COLUMNS: tuple[str, ...] = (
    "id", "image", "caption", "spec", "grounding", "shape_negative", "relation_negative", "binding_negative",
    "width", "height",
)  # fmt: skip
STAGES: tuple[str, ...] = ("data", "tokenizer", "lm_llama", "lm_qwen2", "vae", "evaluator")
_STAGE_PATHS: dict[str, list[str]] = {
    "data": ["data", "images"],
    "tokenizer": ["tokenizer"],
    "lm_llama": ["lm_llama"],
    "lm_qwen2": ["lm_qwen2"],
    "vae": ["vae"],
    "evaluator": [],
}
# Bumped when a stage's code changes what it writes, so old outputs are rebuilt rather than reused.
_STAGE_VERSIONS = {"data": 5, "tokenizer": 1, "lm_llama": 1, "lm_qwen2": 1, "vae": 3, "evaluator": 2}
_EVAL_LIMIT = 300  # images per split scored by the build's evaluator check


def starter_schema() -> Any:
    """The pyarrow schema of the starter Parquet shards."""
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("image", pa.binary()),
            ("caption", pa.string()),
            ("spec", pa.string()),
            ("grounding", pa.string()),  # JSON phrase boxes of relation captions (lidit.layout), else []
            # Hard-negative captions (`captions.shape_negative` / `relation_negative` / `binding_negative`), null
            # where a row has none: training rows only, and never naming a held-out key.
            ("shape_negative", pa.string()),
            ("relation_negative", pa.string()),
            ("binding_negative", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
        ]
    )


@dataclass
class StarterAssets:
    """Paths of a built starter directory, plus its summary."""

    root: Path
    train_parquet: Path
    heldout_parquet: Path
    train_images: Path
    heldout_images: Path
    tokenizer: Path
    lm_llama: Path
    lm_qwen2: Path
    vae: Path
    summary: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def at(cls, root: str | Path, summary: dict[str, Any] | None = None) -> StarterAssets:
        root = Path(root).resolve()
        return cls(
            root=root,
            train_parquet=root / "data" / "train",
            heldout_parquet=root / "data" / "heldout",
            train_images=root / "images" / "train",
            heldout_images=root / "images" / "heldout",
            tokenizer=root / "tokenizer",
            lm_llama=root / "lm_llama",
            lm_qwen2=root / "lm_qwen2",
            vae=root / "vae",
            summary=summary or {},
        )

    def parquet(self, split: str) -> Path:
        """The Parquet folder of a split."""
        return {"train": self.train_parquet, "heldout": self.heldout_parquet}[split]

    def lm(self, family: str) -> Path:
        """The LM folder of a family (`llama` or `qwen2`)."""
        return {"llama": self.lm_llama, "qwen2": self.lm_qwen2}[family]


# ---------------------------------------------------------------- fingerprints


def _files(root: Path, rel_paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for rel in rel_paths:
        p = root / rel
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
    return out


def fingerprint(root: str | Path, rel_paths: list[str]) -> str:
    """sha256 over the relative names and contents of every file under `rel_paths` of `root`."""
    return hash_files(root, _files(Path(root), rel_paths))


def _size(root: Path, rel_paths: list[str]) -> dict[str, int]:
    files = _files(root, rel_paths)
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_summary(root: str | Path) -> dict[str, Any] | None:
    """The summary of a starter directory, or None when there is none (or it is unreadable)."""
    path = Path(root) / SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verify_starter(root: str | Path) -> list[str]:
    """Problems with a built starter directory (empty when every stage's files match their fingerprints)."""
    root = Path(root)
    summary = read_summary(root)
    if summary is None:
        return [f"{root / SUMMARY_FILE} missing or unreadable"]
    problems = []
    if not summary.get("complete"):
        problems.append("build did not complete")
    for stage in STAGES:
        rec = summary.get("stages", {}).get(stage)
        if rec is None:
            problems.append(f"stage {stage} missing")
        elif fingerprint(root, rec["paths"]) != rec["fingerprint"]:
            problems.append(f"stage {stage}: files changed since the build")
    return problems


# ---------------------------------------------------------------- reading


def iter_split(
    root: str | Path | StarterAssets, split: str, limit: int | None = None, decode: bool = True
) -> Iterator[dict[str, Any]]:
    """Rows of a split in id order: `{"id", "image" (PIL if decode else PNG bytes), "caption", "spec" (dict), ...}`."""
    import pyarrow.parquet as pq

    assets = root if isinstance(root, StarterAssets) else StarterAssets.at(root)
    folder = assets.parquet(split)
    shards = sorted(folder.glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no Parquet shards in {folder} (build it with `lidit starter build`)")
    n = 0
    for shard in shards:
        for row in pq.read_table(shard).to_pylist():
            if limit is not None and n >= limit:
                return
            row["spec"] = json.loads(row["spec"])
            if decode:
                row["image"] = from_png(row["image"])
            n += 1
            yield row


def heldout_prompts(assets: StarterAssets | str | Path, n: int) -> list[tuple[str, dict[str, Any]]]:
    """The first `n` held-out `(prompt, spec)` pairs: prompts with colour-shape-relation combinations never
    seen in training (for quickstart samples, serving smoke tests and `lidit eval shapes --images`)."""
    return [(row["caption"], row["spec"]) for row in iter_split(assets, "heldout", limit=n, decode=False)]


def score_split(assets: StarterAssets | str | Path, split: str, limit: int | None = None) -> EvalReport:
    """Score the real starter images of a split against their own captions and specs (should be ~1.0)."""
    return aggregate(
        score_image(r["image"], r["spec"], r["caption"]) for r in iter_split(assets, split, limit)
    )


# ---------------------------------------------------------------- stages


class _Log:
    """Progress lines on stderr, timed from the build's start (wall clock, so worker processes agree)."""

    def __init__(self, enabled: bool, t0: float | None = None) -> None:
        self.enabled = enabled
        self.t0 = time.time() if t0 is None else t0

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[starter {time.time() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n or os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lm_corpus_size(cfg: StarterConfig) -> int:
    # The grammar is cheap to sample, so the LMs see many more captions than there are images (no overfitting to
    # a few thousand sentences); all from train scenes, so held-out combinations stay unseen.
    return max(cfg.data.n_train, min(cfg.lm.steps * cfg.lm.batch_size, 50_000))


def _scenes(cfg: StarterConfig, split: str, n: int, start: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
    """Scenes `start` to `n` of a split as the config's data section draws them (LM corpus and images alike)."""
    held = heldout_combos(cfg.seed, cfg.data.heldout_fraction)
    return sample_scenes(
        cfg.seed, split, n, held, cfg.data.image_size, cfg.data.kind_weights, cfg.data.grid, start
    )


def _captions(cfg: StarterConfig, split: str, n: int, root: Path) -> list[str]:
    """Captions of the first `n` scenes of a split: read from the data stage's shards under `root` (the same
    draw, made once: placing relation scenes takes ~1 ms each), drawn only past their end."""
    import pyarrow.parquet as pq

    captions: list[str] = []
    for shard in sorted(StarterAssets.at(root).parquet(split).glob("*.parquet")):
        if len(captions) >= n:
            break
        captions += pq.read_table(shard, columns=["caption"]).column("caption").to_pylist()
    captions = captions[:n]
    drawn = _scenes(cfg, split, n, start=len(captions))
    return captions + [caption_for(spec, cfg.seed, sid).text for sid, spec in drawn]


def _negative_captions(
    caption: str, spec: dict[str, Any], held: set[Any], seed: int, split: str
) -> dict[str, str | None]:
    """The hard-negative columns of one row: training rows only (held-out rows are never trained on)."""
    if split != "train":
        return {"shape_negative": None, "relation_negative": None, "binding_negative": None}
    return {
        "shape_negative": shape_negative(caption, spec, held, seed),
        "relation_negative": relation_negative(caption, spec, held),
        "binding_negative": binding_negative(caption, spec, held, seed),
    }


def _stage_data(cfg: StarterConfig, out: Path, log: _Log) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    held = heldout_combos(cfg.seed, cfg.data.heldout_fraction)
    metrics: dict[str, Any] = {"heldout_combos": sorted(list(k) for k in held)}
    schema = starter_schema()
    for split, n in (("train", cfg.data.n_train), ("heldout", cfg.data.n_heldout)):
        img_dir = out / "images" / split
        pq_dir = out / "data" / split
        img_dir.mkdir(parents=True)
        pq_dir.mkdir(parents=True)
        rows: list[dict[str, Any]] = []
        shard = 0
        kinds: Counter[str] = Counter()
        size = cfg.data.image_size
        for sid, spec in _scenes(cfg, split, n):
            caption = caption_for(spec, cfg.seed, sid).text
            png = to_png(render(spec))
            (img_dir / f"{sid}.png").write_bytes(png)
            (img_dir / f"{sid}.txt").write_text(caption + "\n")
            spec_json = json.dumps(spec, sort_keys=True)
            rows.append(
                {
                    "id": sid,
                    "image": png,
                    "caption": caption,
                    "spec": spec_json,
                    "grounding": json.dumps(relation_grounding(caption, spec)),
                    "width": size,
                    "height": size,
                }
                | _negative_captions(caption, spec, held, cfg.seed, split)
            )
            kinds[spec["kind"]] += 1
            if len(rows) >= cfg.data.shard_rows or len(rows) + shard * cfg.data.shard_rows == n:
                table = pa.Table.from_pylist(rows, schema=schema)
                pq.write_table(table, pq_dir / f"part-{shard:05d}.parquet", compression="zstd")
                shard, rows = shard + 1, []
        metrics[split] = {"rows": n, "shards": shard, "kinds": dict(sorted(kinds.items()))}
        log(f"data: {split}: {n} images in {shard} shards")
    return metrics


def _stage_tokenizer(cfg: StarterConfig, out: Path, root: Path, log: _Log) -> dict[str, Any]:
    from lidit.starter.text_models import train_tokenizer

    corpus = _captions(cfg, "train", _lm_corpus_size(cfg), root)
    # The instruction is repeated so BPE merges its words too (min_frequency), keeping the encoder prefix short.
    texts = corpus + [cfg.lm.instruction] * max(cfg.tokenizer.min_frequency, 8)
    tok = train_tokenizer(texts, cfg.tokenizer, out / "tokenizer")
    lengths = [len(ids) for ids in tok(corpus[:1000])["input_ids"]]
    metrics = {
        "vocab_size": len(tok),
        "corpus_captions": len(corpus),
        "mean_caption_tokens": round(sum(lengths) / len(lengths), 2),
        "instruction_tokens": len(tok(cfg.lm.instruction, add_special_tokens=False)["input_ids"]),
    }
    log(f"tokenizer: vocab {metrics['vocab_size']}, {metrics['mean_caption_tokens']} tokens per caption")
    return metrics


def _stage_lm(family: str, cfg: StarterConfig, out: Path, root: Path, log: _Log) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from lidit.starter.text_models import save_lm, train_lm

    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    train_texts = _captions(cfg, "train", _lm_corpus_size(cfg), root)
    eval_texts = _captions(cfg, "heldout", cfg.lm.eval_captions, root)
    arch = cfg.lm.llama if family == "llama" else cfg.lm.qwen2
    seed = cfg.seed * 1000 + (1 if family == "llama" else 2)
    model, metrics = train_lm(arch, cfg.lm, tok, train_texts, eval_texts, seed, log)
    save_lm(model, tok, out / f"lm_{family}")
    log(
        f"lm_{family}: {metrics['params'] / 1e6:.2f}M params, held-out perplexity "
        f"{metrics['heldout_perplexity']:.2f} (untrained {metrics['heldout_perplexity_init']:.0f})"
    )
    return metrics


def _load_images(assets: StarterAssets, split: str, limit: int | None = None) -> Any:
    import numpy as np

    return np.stack([np.asarray(r["image"]) for r in iter_split(assets, split, limit)])


def _stage_vae(cfg: StarterConfig, out: Path, root: Path, log: _Log) -> dict[str, Any]:
    import numpy as np

    from lidit.starter.vae import reconstruct, train_vae

    assets = StarterAssets.at(root)
    train = _load_images(assets, "train")
    rows = list(iter_split(assets, "heldout", cfg.vae.eval_images))
    held = np.stack([np.asarray(r["image"]) for r in rows])
    vae, metrics = train_vae(train, held, cfg.vae, cfg.seed, log)
    recon = reconstruct(vae, held)
    # The benchmark on VAE round trips: the ceiling for any generator that decodes through this VAE.
    report = aggregate(score_image(img, r["spec"], r["caption"]) for img, r in zip(recon, rows, strict=True))
    metrics["evaluator_on_reconstructions"] = report.overall
    vae.save_pretrained(str(out / "vae"))
    log(
        f"vae: held-out PSNR {metrics['heldout_psnr_db']:.2f} dB, latents {metrics['latent_shape']}, "
        f"benchmark on reconstructions {report.overall:.3f}"
    )
    return metrics


def _stage_evaluator(cfg: StarterConfig, root: Path, log: _Log) -> dict[str, Any]:
    assets = StarterAssets.at(root)
    metrics: dict[str, Any] = {}
    for split in SPLITS:
        rows = list(iter_split(assets, split, _EVAL_LIMIT))
        items = [(r["image"], r["spec"], r["caption"]) for r in rows]
        real = aggregate(score_image(*item) for item in items)
        metrics[f"real_{split}"] = {
            "overall": real.overall,
            "categories": {k: v["acc"] for k, v in real.categories.items()},
            "n": real.n_images,
        }
        if split == "heldout":
            for name, rep in control_reports(items, seed=cfg.seed).items():
                metrics[name] = {
                    "overall": rep.overall,
                    "categories": {k: v["acc"] for k, v in rep.categories.items()},
                }
        log(f"evaluator: real {split} images score {real.overall:.3f} overall")
    log(
        "evaluator: wrong pairs score "
        + ", ".join(f"{k} {v['overall']:.3f}" for k, v in metrics.items() if not k.startswith("real_"))
    )
    return metrics


# ---------------------------------------------------------------- build


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "tokenizers", "diffusers", "pyarrow", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _run_stage(stage: str, cfg: StarterConfig, tmp: Path, root: Path, log: _Log) -> dict[str, Any]:
    if stage == "data":
        return _stage_data(cfg, tmp, log)
    if stage == "tokenizer":
        return _stage_tokenizer(cfg, tmp, root, log)
    if stage in ("lm_llama", "lm_qwen2"):
        return _stage_lm(stage.split("_")[1], cfg, tmp, root, log)
    if stage == "vae":
        return _stage_vae(cfg, tmp, root, log)
    return _stage_evaluator(cfg, root, log)


def _worker_stage(
    stage: str, cfg_json: str, tmp: str, root: str, t0: float, progress: bool
) -> tuple[dict[str, Any], float, float]:
    """Run one stage in a worker process; returns (metrics, wall seconds, CPU seconds)."""
    cfg = StarterConfig.model_validate_json(cfg_json)
    start, cpu0 = time.perf_counter(), time.process_time()
    with _torch_threads(cfg.threads):
        metrics = _run_stage(stage, cfg, Path(tmp), Path(root), _Log(progress, t0))
    return metrics, time.perf_counter() - start, time.process_time() - cpu0


# Data options added after starters were built, with the default that draws exactly what those builds drew: left
# out of the stage keys at that default, so a new option does not rebuild (and retrain) every existing starter.
_LATER_DATA_DEFAULTS: dict[str, Any] = {"grid": 0}


def _data_key(data: dict[str, Any]) -> dict[str, Any]:
    """The data section as stage keys see it (`_LATER_DATA_DEFAULTS` dropped where they hold)."""
    return {k: v for k, v in data.items() if not (k in _LATER_DATA_DEFAULTS and v == _LATER_DATA_DEFAULTS[k])}


def build_starter_assets(
    out_dir: str | Path, cfg: StarterConfig, preset: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Build or reuse every stage of the starter set in `out_dir`; returns the summary (also `summary.json`).

    With `cfg.parallel`, the LM stages run in one worker process while this process trains the VAE: two
    single-threaded jobs use two cores better than one job with two threads (tiny ops, and OpenMP barriers stall
    badly on a shared, busy machine).
    """
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log = _Log(progress)
    t_start = time.perf_counter()
    old = read_summary(root) or {}
    old_stages = old.get("stages", {}) if old.get("format") == FORMAT_VERSION else {}
    cfg_dump = dump_config(cfg)
    summary: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "complete": False,
        "preset": preset,
        "config": cfg_dump,
        "config_hash": config_hash(cfg_dump),
        "stages": {},
    }
    stages = summary["stages"]
    data_keys = {"seed": cfg.seed, "data": _data_key(cfg_dump["data"])}

    def stage_key(stage: str) -> str:
        inputs: dict[str, Any]
        if stage == "data":
            inputs = data_keys
        elif stage == "tokenizer":
            inputs = {
                **data_keys,
                "tokenizer": cfg_dump["tokenizer"],
                "instruction": cfg.lm.instruction,
                "corpus": _lm_corpus_size(cfg),
            }
        elif stage.startswith("lm_"):
            other = "qwen2" if stage == "lm_llama" else "llama"
            inputs = {
                **data_keys,
                "lm": cfg_dump["lm"] | {other: None},
                "tokenizer": stages["tokenizer"]["fingerprint"],
            }
        elif stage == "vae":
            inputs = {"seed": cfg.seed, "vae": cfg_dump["vae"], "data": stages["data"]["fingerprint"]}
        else:
            inputs = {"seed": cfg.seed, "data": stages["data"]["fingerprint"], "limit": _EVAL_LIMIT}
        return config_hash(
            {"stage": stage, "format": FORMAT_VERSION, "version": _STAGE_VERSIONS[stage], **inputs}
        )

    reused: list[str] = []

    def try_reuse(stage: str, key: str) -> bool:
        prev = old_stages.get(stage)
        paths = _STAGE_PATHS[stage]
        if not prev or prev.get("key") != key or prev.get("paths") != paths:
            return False
        t0 = time.perf_counter()
        if fingerprint(root, paths) != prev.get("fingerprint"):
            log(f"{stage}: files changed since the last build, rebuilding")
            return False
        stages[stage] = prev | {"reused": True}
        reused.append(stage)
        log(f"{stage}: up to date, reused (verified in {time.perf_counter() - t0:.2f}s)")
        return True

    def fresh_tmp(stage: str) -> Path:
        tmp = root / f".tmp-{stage}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def commit(stage: str, key: str, metrics: dict[str, Any], seconds: float, cpu_seconds: float) -> None:
        # Swap the finished outputs in (a killed build never leaves a half-written stage in place).
        paths = _STAGE_PATHS[stage]
        tmp = root / f".tmp-{stage}"
        for rel in paths:
            shutil.rmtree(root / rel, ignore_errors=True)
            os.replace(tmp / rel, root / rel)
        shutil.rmtree(tmp, ignore_errors=True)
        stages[stage] = {
            "key": key,
            "paths": paths,
            "fingerprint": fingerprint(root, paths),
            "size": _size(root, paths),
            "metrics": metrics,
            "seconds": round(seconds, 2),
            # CPU seconds of the process that built it: on a busy shared box this tracks the work done.
            "cpu_seconds": round(cpu_seconds, 2),
            "reused": False,
        }
        log(f"{stage}: done in {seconds:.1f}s")
        _write_json_atomic(root / SUMMARY_FILE, summary)  # resumable stage by stage

    def build_here(stage: str, key: str) -> None:
        log(f"{stage}: building")
        t0, cpu0 = time.perf_counter(), time.process_time()
        tmp = fresh_tmp(stage)
        try:
            with _torch_threads(cfg.threads):
                metrics = _run_stage(stage, cfg, tmp, root, log)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        commit(stage, key, metrics, time.perf_counter() - t0, time.process_time() - cpu0)

    for stage in ("data", "tokenizer"):
        key = stage_key(stage)
        if not try_reuse(stage, key):
            build_here(stage, key)

    keys = {s: stage_key(s) for s in ("lm_llama", "lm_qwen2", "vae")}
    todo = [s for s in ("lm_llama", "lm_qwen2", "vae") if not try_reuse(s, keys[s])]
    lm_todo = [s for s in todo if s.startswith("lm_")]
    if cfg.parallel and "vae" in todo and lm_todo:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the parent may hold torch/OpenMP state and threads that do not survive a fork.
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            futures = {}
            for s in lm_todo:
                log(f"{s}: building (worker process)")
                futures[s] = pool.submit(
                    _worker_stage, s, cfg.model_dump_json(), str(fresh_tmp(s)), str(root), log.t0, progress
                )
            build_here("vae", keys["vae"])
            for s in lm_todo:
                metrics, seconds, cpu_seconds = futures[s].result()
                commit(s, keys[s], metrics, seconds, cpu_seconds)
    else:
        for s in todo:
            build_here(s, keys[s])

    key = stage_key("evaluator")
    if not try_reuse("evaluator", key):
        build_here("evaluator", key)

    summary["stages"] = {s: stages[s] for s in STAGES}  # stable order in the JSON
    stages = summary["stages"]
    summary.update(
        {
            "complete": True,
            "reused": [s for s in STAGES if s in reused],
            "build_seconds": round(time.perf_counter() - t_start, 2),
            "built_cpu_seconds": round(sum(st.get("cpu_seconds", 0.0) for st in stages.values()), 2),
            "paths": {
                "root": str(root),
                **{
                    k: str(v)
                    for k, v in vars(StarterAssets.at(root)).items()
                    if isinstance(v, Path) and k != "root"
                },
            },
            "sizes": {s: stages[s]["size"] for s in STAGES if _STAGE_PATHS[s]},
            "fingerprints": {s: stages[s]["fingerprint"] for s in STAGES if _STAGE_PATHS[s]},
            "quality": {
                "lm_llama_heldout_perplexity": stages["lm_llama"]["metrics"]["heldout_perplexity"],
                "lm_qwen2_heldout_perplexity": stages["lm_qwen2"]["metrics"]["heldout_perplexity"],
                "vae_heldout_psnr_db": stages["vae"]["metrics"]["heldout_psnr_db"],
                "vae_benchmark_on_reconstructions": stages["vae"]["metrics"]["evaluator_on_reconstructions"],
                "evaluator": {k: v["overall"] for k, v in stages["evaluator"]["metrics"].items()},
            },
            "versions": _versions(),
        }
    )
    _write_json_atomic(root / SUMMARY_FILE, summary)
    log(
        f"done in {summary['build_seconds']:.1f}s"
        + (f" (reused: {', '.join(summary['reused'])})" if reused else "")
        + f" -> {root}"
    )
    return summary


def build_starter(
    out_dir: str | Path,
    preset: str | StarterConfig = "default",
    overrides: dict[str, Any] | list[str] | None = None,
    progress: bool = True,
) -> StarterAssets:
    """Build (or reuse, verified by fingerprints) the starter assets in `out_dir`.

    `preset` is a preset name (`default`, `micro`) or a ready `StarterConfig`; `overrides` are a nested dict
    or `key=value` strings (`["vae.steps=100"]`). Progress goes to stderr when `progress`.
    """
    if isinstance(preset, StarterConfig):
        cfg, name = preset, None
    else:
        cfg, name = starter_config(preset, overrides), preset
    summary = build_starter_assets(out_dir, cfg, preset=name, progress=progress)
    return StarterAssets.at(out_dir, summary)


def load_starter(out_dir: str | Path, verify: bool = False) -> StarterAssets:
    """Open a built starter directory (raises when it is not built; `verify` also checks fingerprints)."""
    root = Path(out_dir)
    summary = read_summary(root)
    if summary is None or not summary.get("complete"):
        raise FileNotFoundError(f"no complete starter set in {root}: run `lidit starter build --out {root}`")
    if verify:
        problems = verify_starter(root)
        if problems:
            raise ValueError(f"starter set in {root} does not verify: " + "; ".join(problems))
    return StarterAssets.at(root, summary)
