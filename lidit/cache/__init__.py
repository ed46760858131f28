"""The feature cache contract (`contract`) and its Ray-free reader (`reader`). Written by `pipelines/`.

The reader is imported on first use, so `lidit.cache.contract` stays light (no torch/transformers import).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONTRACT_VERSION", "CacheNotFoundError", "CacheReader", "Manifest", "batch_to_training_inputs"]


def __getattr__(name: str) -> Any:
    if name in ("CONTRACT_VERSION", "Manifest"):
        from lidit.cache import contract

        return getattr(contract, name)
    if name in ("CacheNotFoundError", "CacheReader", "batch_to_training_inputs"):
        from lidit.cache import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'lidit.cache' has no attribute {name!r}")
