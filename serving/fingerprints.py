"""Encoder fingerprints without hashing every weight byte at each replica start.

`PromptEncoder.fingerprint` hashes the whole checkpoint (16 GB for an 8B LLM): right for the cache and the
registry, too slow for every replica start, restart and autoscale. A replica checks it against a small
per-node cache (`$LIDIT_HOME/cache/encoder_fingerprints.json`) keyed by the encoder config and the size and
mtime of each checkpoint file (rsync's quick check): the first start on a node hashes, later ones read.
A checkpoint rewritten in place gets a new mtime, so a new key, so a real hash.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from lidit.config import lidit_home
from lidit.encoder import PromptEncoder
from lidit.fingerprint import MODEL_FILE_SUFFIXES, hash_json


def _cache_file() -> Path:
    return lidit_home() / "cache" / "encoder_fingerprints.json"


def _quick_key(enc: PromptEncoder) -> str:
    root = Path(enc.config.path)
    files = sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES
    )
    return hash_json({"config": enc.config.model_dump(), "path": str(root.resolve()), "files": files})


def cached_fingerprint(enc: PromptEncoder) -> str:
    """`enc.fingerprint`, from the node's cache when the checkpoint files are unchanged since it was hashed."""
    key = _quick_key(enc)
    file = _cache_file()
    try:
        known = json.loads(file.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        # `fingerprint` is a functools.cached_property: a value in the instance dict is what it returns.
        enc.__dict__["fingerprint"] = known[key]
        return known[key]
    fingerprint = enc.fingerprint  # the real hash of every byte
    known[key] = fingerprint
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".fingerprints-")
    with os.fdopen(fd, "w") as f:  # replicas on one node may write at once: whole-file replace, never torn
        json.dump(known, f)
    os.replace(tmp, file)
    return fingerprint
