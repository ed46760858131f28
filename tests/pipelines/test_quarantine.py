"""A dirty source: every failure kind lands in the quarantine table with its reason; the build completes."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cli.main import main as lidit_main
from lidit.cache import contract as C
from lidit.cache.reader import CacheReader
from tests.pipelines.conftest import cache_config


def _png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)  # noise: big IDAT, so a cut lands inside the image data
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels (a decompression bomb's signature)."""
    data = bytearray(_png(0, 8))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def test_dirty_sources_quarantined_with_reasons(cache_starter, ray_local, tmp_path, capsys):
    good = [_png(i) for i in range(4)]
    cap = "a red circle above a blue square"
    rows = [
        ("ok0", good[0], cap),
        ("ok1", good[1], cap),
        ("ok2", good[2], "two green triangles"),
        ("corrupt", b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, cap),
        ("trunc", good[3][: len(good[3]) // 2], cap),
        ("zero", b"", cap),
        ("bomb", _bomb(), cap),
        ("text", b"this is not an image at all", cap),
        ("nocap", good[0], "   "),
        ("long", good[1], " ".join(["red circle"] * 200)),
        ("ok0", good[2], cap),  # duplicate id: the first occurrence is kept
        (None, good[0], cap),
    ]
    src = tmp_path / "dirty.parquet"
    pq.write_table(
        pa.table(
            {
                "id": [r[0] for r in rows],
                "image": pa.array([r[1] for r in rows], pa.binary()),
                "caption": [r[2] for r in rows],
            }
        ),
        src,
    )
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "f1.png").write_bytes(_png(7, 48))
    (folder / "f1.txt").write_text("a small purple square")
    (folder / "f2.png").write_bytes(_png(8))  # no caption file
    (folder / "f3.png").write_bytes(b"GIF89a nonsense")
    (folder / "f3.txt").write_text("a yellow circle")

    cfg = cache_config(cache_starter, tmp_path / "cache")
    config = tmp_path / "cache.yaml"
    import yaml

    config.write_text(yaml.safe_dump(cfg))
    rc = lidit_main(["cache", "build", str(config), "--source", str(src), "--source", str(folder), "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["quarantined"] == {
        "caption_too_long": 1,
        "duplicate_id": 1,
        "empty_caption": 2,
        "empty_image": 1,
        "missing_id": 1,
        "not_an_image": 2,
        "too_large": 1,
        "truncated": 1,
        "undecodable": 1,
    }
    assert s["rows"] == 4
    reader = CacheReader(s["uri"])
    assert sorted(reader.to_arrow([C.COL_ID]).column(0).to_pylist()) == ["f1", "ok0", "ok1", "ok2"]
    q = reader.quarantine()
    assert q.num_rows == 11
    reasons = dict(
        zip(q.column(C.COL_SOURCE_ROW).to_pylist()[:11], q.column(C.COL_REASON).to_pylist(), strict=False)
    )
    assert reasons[10] == "duplicate_id"
    # the folder's 48x48 image went to the one square bucket: 64x64 pixels -> 16x16 latents
    t = reader.to_arrow()
    assert set(t.column(C.COL_BUCKET).to_pylist()) == {"64x64"}
    assert rc == 0 and lidit_main(["cache", "info", s["uri"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 4 and info["quarantine_counts"] == s["quarantined"]
    assert info["versions"] == [1] and info["buckets"] == [
        f"{w}x{h}" for w, h in reader.manifest.image.buckets
    ]
    llama = info["encoders"]["llama"]
    assert llama["path"] == str(cache_starter.lm_llama) and llama["layer"] == -3 and llama["max_length"] == 64
    assert llama["prefix_len"] == reader.prefix_states("llama").shape[0] > 0 and llama["dtype"] == "float16"
    assert llama["instruction"] == reader.encoder_config("llama")["instruction"]
    assert llama["layout_targets"] is False  # no grounded source
    assert info["vae"]["latent_shapes"]["64x64"] == [4, 16, 16]  # the 64x64 bucket's latents seen above
    assert lidit_main(["cache", "info", s["uri"]]) == 0
    text = capsys.readouterr().out
    assert "versions: 1" in text and "layer -3, max_length 64" in text and "64x64 -> 4x16x16" in text
