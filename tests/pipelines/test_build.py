"""Cache build on the micro starter set: contents, read paths, resume, incremental rebuilds."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lidit.cache import contract as C
from lidit.cache.reader import CacheNotFoundError, CacheReader, batch_to_training_inputs
from lidit.encoder import EncoderConfig, PromptEncoder
from pipelines.build import InjectedFailure, build_cache
from pipelines.config import CacheBuildConfig
from tests.pipelines.conftest import cache_config

ROWS = 240  # micro starter train split


@pytest.fixture(scope="module")
def built(cache_starter, ray_local, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cache") / "starter"
    cfg = CacheBuildConfig.model_validate(cache_config(cache_starter, out, mlflow=True))
    return out, build_cache(cfg)


def _states(table, name: str, dtype=np.float16) -> dict[str, np.ndarray]:
    """Plain-pyarrow decoding of one encoder's states, by id (what a non-Ray consumer does)."""
    out = {}
    for rid, data, n in zip(
        table.column(C.COL_ID).to_pylist(),
        table.column(C.states_column(name)).to_pylist(),
        table.column(C.length_column(name)).to_pylist(),
        strict=True,
    ):
        out[rid] = np.frombuffer(data, dtype=dtype).reshape(n, -1)
    return out


def test_build_summary_and_manifest(built):
    out, s = built
    assert s["rows"] + s["quarantined_total"] == ROWS and s["rows"] > 0
    assert s["version"] == 1 and s["new_version"]
    assert s["computed"] == {"latents": s["rows"], "llama": s["rows"], "qwen2": s["rows"]}
    assert s["shards"] == 3 and s["mlflow_run_id"]
    manifest = json.loads((out / "manifests" / "v000001.json").read_text())
    assert [e["name"] for e in manifest["encoders"]] == ["llama", "qwen2"]
    for shard in manifest["shards"]:
        data = (out / shard["path"]).read_bytes()
        assert len(data) == shard["bytes"]
        import hashlib

        assert hashlib.sha256(data).hexdigest() == shard["sha256"]


def test_states_equal_direct_encoding(built, cache_starter):
    out, s = built
    reader = CacheReader(str(out))
    table = pq.read_table(reader.shard_uris()[0])  # plain pyarrow, no Ray, no reader
    ids = table.column(C.COL_ID).to_pylist()[:12]
    captions = table.column(C.COL_CAPTION).to_pylist()[:12]
    for name in reader.encoder_names:
        enc = PromptEncoder(EncoderConfig.model_validate(reader.encoder_config(name)))
        assert enc.fingerprint == reader.encoder_fingerprints[name]
        direct = enc.encode_prompts(captions).unpadded()
        stored = _states(table, name)
        for rid, x in zip(ids, direct, strict=True):
            got = torch.from_numpy(stored[rid].copy()).float()
            torch.testing.assert_close(got, x.half().float(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(reader.prefix_states(name).float(), enc.prefix_states.half().float())


def test_latents_equal_direct_vae(built, cache_starter):
    from diffusers import AutoencoderKL

    from lidit.pipeline import vae_to_latents

    out, _ = built
    reader = CacheReader(str(out))
    table = reader.to_arrow().slice(0, 4)
    src = pq.read_table(cache_starter.train_parquet).to_pylist()
    images = {r["id"]: r["image"] for r in src}
    vae = AutoencoderKL.from_pretrained(reader.vae_path).eval()
    latents, features, ids = batch_to_training_inputs(table, reader)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(images[i])).convert("RGB")) for i in ids])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        want = vae_to_latents(vae.encode(x).latent_dist.mean, vae)
    torch.testing.assert_close(latents, want.half().float(), rtol=2e-3, atol=2e-3)


def test_training_inputs_arrow_and_ray_agree(built, ray_local):
    import ray

    out, s = built
    reader = CacheReader(str(out))
    ds = ray.data.read_parquet(reader.shard_uris(), filesystem=reader.filesystem)
    assert ds.count() == s["rows"]
    batch = next(iter(ds.iter_batches(batch_size=8, batch_format="numpy")))
    lat_r, feats_r, ids_r = batch_to_training_inputs(batch, reader)
    arrow = reader.to_arrow()
    by_id = arrow.filter(np.isin(np.array(arrow.column(C.COL_ID).to_pylist()), ids_r))
    order = [by_id.column(C.COL_ID).to_pylist().index(i) for i in ids_r]
    lat_a, feats_a, ids_a = batch_to_training_inputs(by_id.take(order), reader)
    assert ids_a == ids_r and lat_r.dtype == torch.float32 and lat_r.shape[1] == 4
    torch.testing.assert_close(lat_r, lat_a)
    for fr, fa, e in zip(feats_r, feats_a, reader.manifest.encoders, strict=True):
        assert fr.prefix_len == e.prefix_len and fr.states.shape[-1] == e.hidden_size
        torch.testing.assert_close(fr.states, fa.states)
        assert torch.equal(fr.mask, fa.mask)
    # iter_torch: every row once, one bucket per batch
    seen = [i for _, _, ids in reader.iter_torch(batch_size=64) for i in ids]
    assert sorted(seen) == sorted(arrow.column(C.COL_ID).to_pylist())


def test_rebuild_computes_nothing(built, cache_starter, monkeypatch):
    import pipelines.dedupe

    def scan(*args):
        raise AssertionError("unchanged sources were scanned for duplicate ids again")

    monkeypatch.setattr(pipelines.dedupe, "find_duplicates", scan)  # the memo under plan/ answers
    out, s = built
    again = build_cache(CacheBuildConfig.model_validate(cache_config(cache_starter, out)))
    assert again["computed"] == {"latents": 0, "llama": 0, "qwen2": 0}
    assert again["reused"] == s["computed"] and not again["new_version"] and again["version"] == 1


def test_kill_and_resume_equals_uninterrupted(built, cache_starter, tmp_path):
    ref_out, ref = built
    out = tmp_path / "resumed"
    with pytest.raises(InjectedFailure):
        build_cache(CacheBuildConfig.model_validate(cache_config(cache_starter, out, fail_after_shards=1)))
    with pytest.raises(CacheNotFoundError):  # nothing committed: no manifest yet
        CacheReader(str(out))
    # Workers write shards in parallel: units in flight when the failure hit may have landed too.
    landed = len(list((out / C.SHARD_DIR).glob("*.json")))
    assert 1 <= landed < 3
    s = build_cache(CacheBuildConfig.model_validate(cache_config(cache_starter, out)))
    assert s["shards_reused"] == landed and s["shards_written"] == 3 - landed
    got, want = CacheReader(str(out)).to_arrow(), CacheReader(str(ref_out)).to_arrow()
    ids = got.column(C.COL_ID).to_pylist()
    assert len(ids) == len(set(ids)) == ref["rows"]
    assert ids == want.column(C.COL_ID).to_pylist()
    for col in (C.COL_CAPTION, C.COL_LATENT_HEIGHT, C.length_column("llama"), C.length_column("qwen2")):
        assert got.column(col).equals(want.column(col))
    for name in ("llama", "qwen2"):
        a, b = _states(got, name), _states(want, name)
        assert all(np.allclose(a[i], b[i], rtol=2e-3, atol=2e-3) for i in ids)


def test_incremental_rebuilds(built, cache_starter, tmp_path):
    ref_out, ref = built
    out = tmp_path / "inc"
    shutil.copytree(ref_out, out)
    rows = ref["rows"]
    base = cache_config(cache_starter, out)

    # 1. a changed instruction recomputes only that encoder's columns
    cfg = json.loads(json.dumps(base))
    cfg["encoders"][1]["instruction"] = "Describe the picture:"
    s = build_cache(CacheBuildConfig.model_validate(cfg))
    assert s["computed"] == {"latents": 0, "llama": 0, "qwen2": rows}
    assert s["reused"] == {"latents": rows, "llama": rows, "qwen2": 0} and s["version"] == 2
    reader = CacheReader(str(out))
    assert reader.prefix_states("qwen2").shape[0] < CacheReader(str(ref_out)).prefix_states("qwen2").shape[0]

    # 2. a changed VAE recomputes only the latents
    vae = tmp_path / "vae2"
    shutil.copytree(cache_starter.vae, vae)
    conf = json.loads((vae / "config.json").read_text())
    conf["scaling_factor"] = conf["scaling_factor"] * 2
    (vae / "config.json").write_text(json.dumps(conf))
    cfg["vae"] = str(vae)
    s = build_cache(CacheBuildConfig.model_validate(cfg))
    assert s["computed"] == {"latents": rows, "llama": 0, "qwen2": 0} and s["version"] == 3
    old = CacheReader(str(out), version=2).to_arrow().slice(0, 8)
    new = CacheReader(str(out)).to_arrow().slice(0, 8)
    r2, r3 = CacheReader(str(out), version=2), CacheReader(str(out))
    torch.testing.assert_close(batch_to_training_inputs(new, r3)[0], 2 * batch_to_training_inputs(old, r2)[0])

    # 3. a new source file computes only its rows
    extra = tmp_path / "extra" / "part-new.parquet"
    extra.parent.mkdir()
    held = pq.read_table(sorted(Path(cache_starter.heldout_parquet).glob("*.parquet"))[0]).slice(0, 20)
    pq.write_table(held, extra)
    cfg["sources"].append({"uri": str(extra)})
    s = build_cache(CacheBuildConfig.model_validate(cfg))
    assert s["computed"] == {"latents": 20, "llama": 20, "qwen2": 20}
    assert s["reused"] == {"latents": rows, "llama": rows, "qwen2": rows}
    ids = CacheReader(str(out)).to_arrow([C.COL_ID]).column(0).to_pylist()
    assert len(ids) == len(set(ids)) == rows + 20
