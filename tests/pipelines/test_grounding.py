"""Grounded sources: the cache stores each encoder's per-token layout targets, computed from the grounding
after the bucket crop; a malformed grounding quarantines its row; training reads them padded like the states."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from lidit.cache import contract as C
from lidit.cache.reader import CacheReader, batch_layout_targets, batch_to_training_inputs
from lidit.encoder import EncoderConfig, PromptEncoder
from lidit.layout import crop_grounding, grounding_targets, parse_grounding
from pipelines.build import build_cache
from pipelines.config import CacheBuildConfig
from tests.pipelines.conftest import cache_config

CAPTION = "a red square to the left of a small cyan circle"
LEFT_RIGHT = [[0, 12, 0.05, 0.3, 0.45, 0.7], [28, 47, 0.6, 0.4, 0.9, 0.6]]


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_grounded_source_stores_layout_targets(cache_starter, ray_local, tmp_path):
    rows = [  # id, (width, height), caption, grounding as stored
        ("square", (64, 64), CAPTION, json.dumps(LEFT_RIGHT)),
        ("wide", (128, 64), CAPTION, json.dumps(LEFT_RIGHT)),  # 2:1 into the 64x64 bucket: centre crop
        ("listed", (64, 64), CAPTION, None),  # no grounding: every target 0
        ("empty", (64, 64), "two green triangles", "[]"),
        ("past_end", (64, 64), CAPTION, json.dumps([[0, 99, 0.1, 0.1, 0.2, 0.2]])),
        ("not_json", (64, 64), CAPTION, "[[0, 12"),
    ]
    src = tmp_path / "grounded.parquet"
    pq.write_table(
        pa.table(
            {
                "id": [r[0] for r in rows],
                "image": pa.array([_png(*r[1], seed=k) for k, r in enumerate(rows)], pa.binary()),
                "caption": [r[2] for r in rows],
                "boxes": pa.array([r[3] for r in rows], pa.string()),
            }
        ),
        src,
    )
    source = {"uri": str(src), "grounding_column": "boxes"}
    cfg = cache_config(cache_starter, tmp_path / "cache", sources=[source], buckets=[(64, 64)])
    summary = build_cache(CacheBuildConfig.model_validate(cfg))
    assert summary["quarantined"] == {"bad_grounding": 2}
    reader = CacheReader(summary["uri"])
    assert reader.has_layout and all(e.layout for e in reader.manifest.encoders)
    assert all(e["layout_targets"] for e in reader.describe()["encoders"].values())  # `lidit cache info`
    quarantine = reader.quarantine()
    details = dict(zip(quarantine[C.COL_ID].to_pylist(), quarantine[C.COL_DETAIL].to_pylist(), strict=True))
    assert "outside the caption" in details["past_end"] and "not JSON" in details["not_json"]

    table = reader.to_arrow()
    by_id = {r: k for k, r in enumerate(table[C.COL_ID].to_pylist())}
    source_rows = {r[0]: r for r in rows}
    assert sorted(by_id) == ["empty", "listed", "square", "wide"]
    latents, texts, ids = batch_to_training_inputs(table, reader)
    layout = batch_layout_targets(table, reader, texts)
    for b, name in enumerate(reader.encoder_names):
        encoder = PromptEncoder(EncoderConfig.model_validate(reader.encoder_config(name)))
        spans = dict(zip(ids, encoder.token_spans(table[C.COL_CAPTION].to_pylist()), strict=True))
        lengths = table[C.length_column(name)].to_pylist()
        for rid, k in by_id.items():
            _, (width, height), caption, stored = source_rows[rid]
            grounding = parse_grounding(stored, caption)
            expected = grounding_targets(crop_grounding(grounding, width, height, (64, 64)), spans[rid])
            assert layout.mask[b][k].sum() == lengths[k] == len(expected)
            torch.testing.assert_close(layout.targets[b][k, : lengths[k]], expected, atol=1e-3, rtol=1e-3)
            assert layout.targets[b][k, lengths[k] :].abs().sum() == 0  # padding
        square, wide = layout.targets[b][by_id["square"]], layout.targets[b][by_id["wide"]]
        assert (
            square[:, 0].min() < -0.5 and square[:, 0].max() > 0.5
        )  # the red square's words left, the circle's right
        torch.testing.assert_close(wide, 2 * square, atol=2e-3, rtol=1e-3)  # the crop halves the width seen
        assert layout.targets[b][by_id["listed"]].abs().sum() == 0
        assert layout.targets[b][by_id["empty"]].abs().sum() == 0
