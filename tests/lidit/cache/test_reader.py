"""The reader on a hand-written cache (no Ray, no pipeline): manifest, prefix, batches in both formats."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from lidit.cache import contract as C
from lidit.cache.reader import CacheNotFoundError, CacheReader, batch_to_training_inputs

D = {"a": 6, "b": 4}
P = {"a": 3, "b": 0}


def _write_cache(root: Path) -> dict[str, dict]:
    torch.manual_seed(0)
    truth: dict[str, dict] = {}
    rows = []
    for i in range(10):
        h, w = (4, 4) if i % 3 else (2, 8)  # two buckets
        lat = torch.randn(4, h, w).half()
        rec = {
            C.COL_ID: f"r{i}", C.COL_CAPTION: f"caption {i}", C.COL_SOURCE: "mem", C.COL_SOURCE_ROW: i,
            C.COL_WIDTH: w * 8, C.COL_HEIGHT: h * 8, C.COL_BUCKET: f"{w * 8}x{h * 8}",
            C.COL_BUCKET_WIDTH: w * 8, C.COL_BUCKET_HEIGHT: h * 8,
            C.COL_LATENT: C.encode_tensor(lat, "float16"), C.COL_LATENT_HEIGHT: h, C.COL_LATENT_WIDTH: w,
        }  # fmt: skip
        truth[f"r{i}"] = {"latent": lat}
        for name, d in D.items():
            x = torch.randn(1 + i % 4, d).half()
            rec[C.states_column(name)] = C.encode_tensor(x, "float16")
            rec[C.length_column(name)] = x.shape[0]
            truth[f"r{i}"][name] = x
        rows.append(rec)
    schema = C.shard_schema(list(D))
    shards = []
    for k, part in enumerate((rows[:6], rows[6:])):
        path = f"{C.SHARD_DIR}/s{k}.parquet"
        (root / C.SHARD_DIR).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(part, schema=schema), root / path)
        qpath = f"{C.QUARANTINE_DIR}/s{k}.parquet"
        (root / C.QUARANTINE_DIR).mkdir(exist_ok=True)
        pq.write_table(C.QUARANTINE_SCHEMA.empty_table(), root / qpath)
        data = (root / path).read_bytes()
        shards.append(
            C.ShardEntry(
                path=path, rows=len(part), bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), unit=f"u{k}",
                source="mem", groups={}, quarantine_path=qpath, quarantine_rows=0,
            )
        )  # fmt: skip
    encoders = []
    (root / C.PREFIX_DIR).mkdir()
    for name, d in D.items():
        prefix = torch.randn(P[name], d).half()
        truth[f"prefix_{name}"] = prefix
        save_file({C.PREFIX_TENSOR: prefix}, root / C.PREFIX_DIR / f"{name}.safetensors")
        encoders.append(
            C.EncoderEntry(
                name=name, config={"name": name}, fingerprint="f", group_fingerprint="g", hidden_size=d,
                prefix_len=P[name], prefix_file=f"{C.PREFIX_DIR}/{name}.safetensors", prefix_sha256="x",
            )
        )  # fmt: skip
    manifest = C.Manifest(
        version=1,
        created_at="now",
        rows=10,
        sources=[],
        image=C.ImageSettings(resolution=32, buckets=[(32, 32)], max_image_pixels=10**6, min_image_side=8),
        vae=C.VaeEntry(
            path="vae", fingerprint="v", group_fingerprint="g", latent_channels=4, scale=8, scaling_factor=1.0
        ),
        encoders=encoders,
        shards=shards,
    )
    (root / C.MANIFEST_DIR).mkdir()
    (root / C.manifest_name(1)).write_text(manifest.model_dump_json())
    return truth


def test_reader_and_training_inputs(tmp_path):
    truth = _write_cache(tmp_path)
    reader = CacheReader(str(tmp_path))
    assert reader.encoder_names == ["a", "b"] and reader.version == 1 and reader.num_rows == 10
    assert torch.equal(reader.prefix_states("a"), truth["prefix_a"])
    assert reader.prefix_states("b").shape == (0, 4)
    table = reader.to_arrow()
    square = table.filter(pa.compute.equal(table.column(C.COL_BUCKET), "32x32"))
    latents, feats, ids = batch_to_training_inputs(square, reader)
    assert latents.dtype == torch.float32 and latents.shape == (len(ids), 4, 4, 4)
    for j, rid in enumerate(ids):
        assert torch.equal(latents[j], truth[rid]["latent"].float())
        for f, name in zip(feats, "ab", strict=True):
            n = truth[rid][name].shape[0]
            assert f.prefix_len == P[name]
            assert torch.equal(f.states[j, P[name] : P[name] + n], truth[rid][name].float())
            assert f.mask[j].sum() == P[name] + n
            assert torch.equal(f.states[j, : P[name]], truth[f"prefix_{name}"].float())
    # the dict-of-numpy form (Ray Data batch_format="numpy") gives the same tensors
    numpy_batch = {c: square.column(c).to_numpy(zero_copy_only=False) for c in square.schema.names}
    latents2, feats2, ids2 = batch_to_training_inputs(numpy_batch, reader)
    assert ids2 == ids and torch.equal(latents2, latents) and torch.equal(feats2[0].states, feats[0].states)
    with pytest.raises(ValueError, match="bucket"):
        batch_to_training_inputs(table, reader)


def test_iter_torch_groups_buckets(tmp_path):
    _write_cache(tmp_path)
    reader = CacheReader(str(tmp_path))
    seen = []
    for latents, _, ids in reader.iter_torch(batch_size=3, shuffle=True):
        assert latents.shape[0] == len(ids) <= 3
        seen += ids
    assert sorted(seen) == sorted(f"r{i}" for i in range(10))


def test_missing_cache_is_clear(tmp_path):
    with pytest.raises(CacheNotFoundError, match="no committed"):
        CacheReader(str(tmp_path / "nothing"))
