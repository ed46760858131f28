"""Content hashing, in one place: fingerprints for models, configs, files and bytes.

What the cache, the starter build and the registry use to tell stale from fresh. Each function's output is
recorded in existing manifests and starter summaries, so none of them may change what it returns:
`hash_model_dir` (encoder/VAE fingerprints in cache manifests) keeps its original unframed layout.

`hash_model_dir` reads every weight byte once per directory state: its digest is memoised under
`$LIDIT_HOME/fingerprints/`, keyed by the directory's path and each file's name, size and mtime (the rule make
and rsync use), so a build over unchanged 30 GB checkpoints does not rehash them.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

CHUNK = 8 * 2**20
# Files that define a checkpoint; tokenizer and config files matter as much as the weights.
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".bin")


def hash_bytes(data: bytes) -> str:
    """sha256 of bytes (shard and prefix-file checksums)."""
    return hashlib.sha256(data).hexdigest()


def hash_file(path: str | Path, digest: Any | None = None) -> str:
    """sha256 of a file's bytes (streamed)."""
    h = digest or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_model_dir(path: str | Path) -> str:
    """sha256 over the names and bytes of a checkpoint directory's weight, config and tokenizer files.

    Memoised by (path, file names, sizes, mtimes): unchanged files are not read again (see the module doc).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES)
    stats = [(str(f.relative_to(root)), f.stat()) for f in files]
    listing = [str(root.resolve())] + [[name, st.st_size, st.st_mtime_ns] for name, st in stats]
    memo = _memo_dir() / f"{hash_json(listing)[:40]}.sha256"
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for file in files:
        h.update(str(file.relative_to(root)).encode())
        hash_file(file, h)
    digest = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:  # a read-only home only costs the rehash next time
        pass
    return digest


def _memo_dir() -> Path:
    # LIDIT_HOME as lidit.config.lidit_home reads it; not imported from there to keep this module dependency-free
    return Path(os.environ.get("LIDIT_HOME", ".lidit")).expanduser() / "fingerprints"


def hash_files(root: str | Path, files: list[Path]) -> str:
    """sha256 over `files`' names relative to `root` and their contents' digests, in the given order.

    Name and content are framed (NUL after the name, a fixed-size digest per file), so moving bytes between a
    name and the next file cannot collide. The starter build records these for each stage's outputs.
    """
    base = Path(root)
    h = hashlib.sha256()
    for file in files:
        h.update(file.relative_to(base).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(file.read_bytes()).digest())
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """sha256 of a canonical JSON rendering (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
