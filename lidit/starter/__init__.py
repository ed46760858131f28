"""Offline starter assets and the built-in compositional benchmark (DESIGN 1.5).

No weights or data can be downloaded here, so the project builds its own small but real assets in the standard
formats: a coloured-shapes image-caption set with exact ground truth (Parquet shards + image folders, a held-out
split of unseen colour-shape-relation combinations), a BPE tokenizer, two tiny causal LMs of different families
(Llama, Qwen2) and a tiny `AutoencoderKL`; plus a deterministic GenEval-style evaluator.

    from lidit.starter import build_starter, heldout_prompts, score_images
    assets = build_starter("/tmp/starter", preset="micro")      # reuses what is there on a second call
    AutoModelForCausalLM.from_pretrained(assets.lm_llama)        # like any checkpoint

Importing this package does not import torch: the heavy parts load inside the build stages.
"""

from lidit.starter.build import (
    STARTER_COLUMNS,
    SUMMARY_FILE,
    StarterAssets,
    build_starter,
    build_starter_assets,
    fingerprint,
    heldout_prompts,
    iter_split,
    load_starter,
    read_summary,
    score_split,
    starter_schema,
    verify_starter,
)
from lidit.starter.captions import Caption, Mention, caption_for, locate_mentions, position_bin
from lidit.starter.config import DEFAULT_INSTRUCTION, PRESETS, StarterConfig, starter_config
from lidit.starter.evaluator import (
    CATEGORIES,
    SPECS_FILE,
    Detection,
    EvalReport,
    ImageScore,
    aggregate,
    control_reports,
    detect_objects,
    format_report,
    read_image_folder,
    score_folder,
    score_image,
    score_images,
    write_image_folder,
)
from lidit.starter.render import render
from lidit.starter.scenes import sample_scene, sample_scenes

__all__ = [
    "CATEGORIES",
    "DEFAULT_INSTRUCTION",
    "PRESETS",
    "SPECS_FILE",
    "STARTER_COLUMNS",
    "SUMMARY_FILE",
    "Caption",
    "Detection",
    "EvalReport",
    "ImageScore",
    "Mention",
    "StarterAssets",
    "StarterConfig",
    "aggregate",
    "build_starter",
    "build_starter_assets",
    "caption_for",
    "control_reports",
    "detect_objects",
    "fingerprint",
    "format_report",
    "heldout_prompts",
    "iter_split",
    "load_starter",
    "locate_mentions",
    "position_bin",
    "read_image_folder",
    "read_summary",
    "render",
    "sample_scene",
    "sample_scenes",
    "score_folder",
    "score_image",
    "score_images",
    "score_split",
    "starter_config",
    "starter_schema",
    "verify_starter",
    "write_image_folder",
]
