"""Sources with negative captions: the cache stores each encoder's states of every row's negative caption
(empty for a row without one), quarantines a negative no encoder can take, and training reads them as the
step's `HardNegatives`, padded like the true captions."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lidit.cache import contract as C
from lidit.cache.reader import CacheReader, batch_negatives, batch_to_training_inputs
from lidit.config import ConfigError
from lidit.encoder import EncoderConfig, PromptEncoder
from pipelines.build import build_cache
from pipelines.config import CacheBuildConfig
from pipelines.stages import Rejected, _negative_caption
from tests.pipelines.conftest import cache_config
from training.data import bucketed_batches

ROWS = [  # id, caption, negative caption as stored
    ("swap", "a red square to the left of a cyan circle", "a red circle to the left of a cyan square"),
    ("none", "two green triangles", None),
    ("blank", "a blue diamond", "  "),
    ("also", "a yellow circle", "a yellow triangle"),
    ("too_long", "a red square", " ".join(["square"] * 80)),  # more tokens than max_length 64
]


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _source(tmp_path) -> str:
    src = tmp_path / "negatives.parquet"
    table = {
        "id": [r[0] for r in ROWS],
        "image": pa.array([_png(k) for k in range(len(ROWS))], pa.binary()),
        "caption": [r[1] for r in ROWS],
        "negative": pa.array([r[2] for r in ROWS], pa.string()),
    }
    pq.write_table(pa.table(table), src)
    return str(src)


def test_negative_captions_are_cached_and_batched(cache_starter, ray_local, tmp_path):
    source = {"uri": _source(tmp_path), "negative_caption_column": "negative"}
    cfg = cache_config(cache_starter, tmp_path / "cache", sources=[source], buckets=[(64, 64)])
    summary = build_cache(CacheBuildConfig.model_validate(cfg))
    assert summary["quarantined"] == {"bad_negative_caption": 1}
    reader = CacheReader(summary["uri"])
    assert reader.has_negatives and not reader.has_layout
    assert all(e["negative_captions"] for e in reader.describe()["encoders"].values())  # `lidit cache info`
    detail = reader.quarantine()[C.COL_DETAIL].to_pylist()[0]
    assert detail.startswith("negative caption: ") and "> max_length=64" in detail

    table = reader.to_arrow()
    ids = table[C.COL_ID].to_pylist()
    assert ids == ["swap", "none", "blank", "also"]
    assert table[C.COL_NEGATIVE_CAPTION].to_pylist() == [ROWS[0][2], None, None, ROWS[3][2]]
    _, texts, _ = batch_to_training_inputs(table, reader)
    hard = batch_negatives(table, reader)
    assert hard is not None and hard.rows.tolist() == [0, 3]
    for b, name in enumerate(reader.encoder_names):
        assert table[C.negative_length_column(name)].to_pylist()[1:3] == [0, 0]
        encoder = PromptEncoder(EncoderConfig.model_validate(reader.encoder_config(name)))
        expected = encoder.encode_prompts([ROWS[0][2], ROWS[3][2]]).unpadded()
        feats = hard.texts[b]
        assert feats.prefix_len == texts[b].prefix_len
        torch.testing.assert_close(
            feats.states[:, : feats.prefix_len], texts[b].states[:2, : feats.prefix_len]
        )
        for k, x in enumerate(expected):
            got = feats.states[k, feats.prefix_len :][feats.mask[k, feats.prefix_len :]]
            # stored float16, like the true captions' states
            torch.testing.assert_close(got, x.to(torch.float16).float(), atol=1e-3, rtol=1e-3)

    # The loader hands the same negatives to the step, rows matching the batch's rows.
    batch = next(bucketed_batches(reader, 4, 0, 1, seed=0, negatives=True))
    assert batch.negatives is not None
    with_negative = [batch.ids[i] for i in batch.negatives.rows.tolist()]
    assert sorted(with_negative) == ["also", "swap"]
    assert next(bucketed_batches(reader, 4, 0, 1, seed=0)).negatives is None  # not asked for

    # Building again reuses every row; a cache without the column keeps its old group fingerprints.
    again = build_cache(CacheBuildConfig.model_validate(cfg))
    assert again["computed"] == {"latents": 0, "llama": 0, "qwen2": 0} and not again["new_version"]


def test_negative_caption_values():
    assert _negative_caption("a red circle") == "a red circle"
    assert _negative_caption(None) is None and _negative_caption(" \n") is None
    with pytest.raises(Rejected) as err:
        _negative_caption(3)
    assert (err.value.reason, err.value.detail) == ("bad_negative_caption", "not a string: int")


def test_cache_without_negatives_is_a_clear_error(cache_starter, ray_local, tmp_path):
    source = {"uri": _source(tmp_path)}
    cfg = cache_config(cache_starter, tmp_path / "cache", sources=[source], buckets=[(64, 64)])
    reader = CacheReader(build_cache(CacheBuildConfig.model_validate(cfg))["uri"])
    assert not reader.has_negatives and C.COL_NEGATIVE_CAPTION not in reader.to_arrow().column_names
    with pytest.raises(
        ValueError, match="no negative captions: build it with a source's negative_caption_column"
    ):
        batch_negatives(reader.to_arrow(), reader)


def test_negative_captions_need_a_parquet_source(cache_starter, tmp_path):
    from pipelines.sources import discover

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(0))
    source = CacheBuildConfig.model_validate(
        cache_config(
            cache_starter, tmp_path / "cache", sources=[{"uri": str(folder), "negative_caption_column": "n"}]
        )
    ).sources[0]
    with pytest.raises(ConfigError, match="negative_caption_column needs a Parquet source"):
        discover(source, {})
