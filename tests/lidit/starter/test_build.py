from __future__ import annotations

import json
import shutil
import time

import pyarrow.parquet as pq
import pytest

from lidit.config import ConfigError
from lidit.starter import (
    STARTER_COLUMNS,
    build_starter,
    heldout_prompts,
    iter_split,
    load_starter,
    starter_config,
    verify_starter,
)
from lidit.starter.captions import binding_negative, relation_negative, shape_negative
from lidit.starter.scenes import combo_keys


def test_layout_and_parquet_schema(starter_micro) -> None:
    a = starter_micro
    for path in (a.tokenizer, a.lm_llama, a.lm_qwen2, a.vae, a.train_images, a.heldout_images):
        assert path.is_dir()
    summary = json.loads((a.root / "summary.json").read_text())
    assert summary["complete"] and summary["preset"] == "micro"
    assert set(summary["fingerprints"]) == {"data", "tokenizer", "lm_llama", "lm_qwen2", "vae"}
    assert {"lm_llama_heldout_perplexity", "lm_qwen2_heldout_perplexity", "vae_heldout_psnr_db"} <= set(
        summary["quality"]
    )
    shards = sorted(a.train_parquet.glob("*.parquet"))
    assert len(shards) == 3  # 240 rows, 100 per shard
    table = pq.read_table(shards[0])
    assert tuple(table.column_names) == STARTER_COLUMNS
    assert str(table.schema.field("image").type) == "binary"
    rows = list(iter_split(a, "train", decode=False))
    assert len(rows) == 240 and len({r["id"] for r in rows}) == 240
    first = rows[0]
    assert first["id"] == "train-000000" and first["width"] == first["height"] == 64
    # The image folder holds the same rows.
    assert (a.train_images / "train-000000.png").read_bytes() == first["image"]
    assert (a.train_images / "train-000000.txt").read_text().strip() == first["caption"]
    assert len(list(a.heldout_images.glob("*.png"))) == 60


def test_splits_respect_heldout_combinations(starter_micro) -> None:
    held = {tuple(k) for k in starter_micro.summary["stages"]["data"]["metrics"]["heldout_combos"]}
    train = list(iter_split(starter_micro, "train", decode=False))
    assert not any(combo_keys(r["spec"]) & held for r in train)
    # Hard-negative captions: training rows only, and what the caption module draws for each row.
    assert all(r["shape_negative"] == shape_negative(r["caption"], r["spec"], held) for r in train)
    assert all(r["relation_negative"] == relation_negative(r["caption"], r["spec"], held) for r in train)
    assert all(r["binding_negative"] == binding_negative(r["caption"], r["spec"], held) for r in train)
    assert sum(r["shape_negative"] is not None for r in train) > 0.8 * len(train)
    heldout = list(iter_split(starter_micro, "heldout", decode=False))
    assert all(
        r[k] is None for r in heldout for k in ("shape_negative", "relation_negative", "binding_negative")
    )
    prompts = heldout_prompts(starter_micro, 5)
    assert len(prompts) == 5 and all(combo_keys(spec) & held for _, spec in prompts)
    assert all(isinstance(p, str) and p for p, _ in prompts)


def test_lm_captions_read_from_the_data_are_the_captions_drawn(starter_micro) -> None:
    """The tokenizer and LM stages read the data stage's captions instead of drawing every scene again; past
    the written rows they draw the rest, and either way the corpus is the one the scene grammar draws."""
    from lidit.starter.build import _captions, _scenes
    from lidit.starter.captions import caption_for

    cfg = starter_config("micro")
    for split, n in (("train", cfg.data.n_train + 7), ("heldout", cfg.data.n_heldout // 2)):
        drawn = [caption_for(spec, cfg.seed, sid).text for sid, spec in _scenes(cfg, split, n)]
        assert _captions(cfg, split, n, starter_micro.root) == drawn and len(drawn) == n


def test_second_build_reuses_everything_in_seconds(starter_micro) -> None:
    before = starter_micro.summary["fingerprints"]
    t0 = time.perf_counter()
    again = build_starter(starter_micro.root, preset="micro", progress=False)
    assert time.perf_counter() - t0 < 5
    assert again.summary["reused"] == ["data", "tokenizer", "lm_llama", "lm_qwen2", "vae", "evaluator"]
    assert again.summary["fingerprints"] == before
    assert load_starter(starter_micro.root, verify=True).summary["fingerprints"] == before


def test_stage_keys_of_builds_before_a_new_option_still_hold(starter_micro) -> None:
    # The micro preset's data-stage key since data version 5 (the hard-negative columns, a deliberate rebuild;
    # 830432ebed9ca1ab before them): an option added later at its default must not rebuild existing starters.
    assert starter_micro.summary["stages"]["data"]["key"] == "b2b04ec5b54a7e24"


def test_verify_detects_changed_files(starter_micro, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(starter_micro.root, copy)
    assert verify_starter(copy) == []
    (copy / "images" / "train" / "train-000003.txt").write_text("a tampered caption\n")
    (copy / "vae" / "config.json").write_text("{}")
    problems = verify_starter(copy)
    assert any("data" in p for p in problems) and any("vae" in p for p in problems)
    with pytest.raises(ValueError, match="does not verify"):
        load_starter(copy, verify=True)
    with pytest.raises(FileNotFoundError, match="lidit starter build"):
        load_starter(tmp_path / "empty")


def test_config_presets_and_overrides() -> None:
    cfg = starter_config("micro", ["vae.steps=3", "lm.llama.hidden_size=16"])
    assert cfg.vae.steps == 3 and cfg.lm.llama.hidden_size == 16 and cfg.data.n_train == 240
    assert starter_config("default").data.n_train > 1000
    with pytest.raises(ConfigError, match="unknown key"):
        starter_config("micro", ["vae.stepz=3"])
    with pytest.raises(ConfigError, match="unknown starter preset"):
        starter_config("huge")
    mix = starter_config(
        "micro", ["data.kind_weights.single=1", "data.kind_weights.count=0"]
    ).data.kind_weights
    assert mix == {"single": 1.0, "count": 0.0, "pair": 0.15, "relation": 0.4}  # unnamed kinds keep defaults
    with pytest.raises(ConfigError, match="kind weights must be >= 0"):
        starter_config("micro", ["data.kind_weights.single=-1"])
    with pytest.raises(ConfigError, match="kind_weights"):
        starter_config("micro", ["data.kind_weights.blob=1"])
