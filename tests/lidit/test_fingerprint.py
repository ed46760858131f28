"""The one content-hashing module: outputs pinned, because manifests and starter summaries record them."""

from __future__ import annotations

from pathlib import Path

from lidit.fingerprint import hash_bytes, hash_files, hash_json, hash_model_dir
from lidit.instruction import DEFAULT_INSTRUCTION


def _tree(root: Path) -> list[Path]:
    (root / "a.json").write_text('{"x": 1}')
    (root / "sub").mkdir()
    (root / "sub" / "w.safetensors").write_bytes(b"\x00\x01weights")
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_hashes_are_stable(tmp_path: Path) -> None:
    files = _tree(tmp_path)
    # Values of the implementations these replaced (starter build, starter config_hash, pipelines.build).
    assert hash_files(tmp_path, files)[:16] == "10c4fd9bbd64c4c5"
    assert hash_model_dir(tmp_path)[:16] == "0aeae0efd28eb2d3"
    assert hash_json({"b": [1, 2], "a": "x"})[:16] == "5125d018f84d57c4"
    assert hash_bytes(b"lidit")[:16] == "3ce162f441a74a13"


def test_file_hash_frames_names_and_contents(tmp_path: Path) -> None:
    (tmp_path / "ab").write_bytes(b"c")
    (tmp_path / "a").write_bytes(b"bc")
    assert hash_files(tmp_path, [tmp_path / "ab"]) != hash_files(tmp_path, [tmp_path / "a"])


def test_one_default_instruction() -> None:
    from lidit.encoder import EncoderConfig
    from lidit.starter.config import DEFAULT_INSTRUCTION as starter_instruction

    assert EncoderConfig(name="x", path="/m").instruction == DEFAULT_INSTRUCTION is starter_instruction
    assert DEFAULT_INSTRUCTION.startswith("Describe the image by detailing the color, shape")


def test_model_dir_hash_is_memoised_by_size_and_mtime(tmp_path: Path, monkeypatch) -> None:
    """Unchanged files (same names, sizes, mtimes) are not read again; a touched file is."""
    import os

    monkeypatch.setenv("LIDIT_HOME", str(tmp_path / "home"))
    model = tmp_path / "model"
    model.mkdir()
    _tree(model)
    weights = model / "sub" / "w.safetensors"
    first = hash_model_dir(model)
    assert first[:16] == "0aeae0efd28eb2d3" and list((tmp_path / "home" / "fingerprints").iterdir())
    st = weights.stat()
    weights.write_bytes(b"\x00\x02weights")  # same size; mtime restored below: the memo answers
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert hash_model_dir(model) == first
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a touch: rehashed, new content seen
    assert hash_model_dir(model) != first
