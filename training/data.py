"""Cache -> training batches: column selection for Ray Data and bucket-aware batching of its numpy batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from lidit.cache import contract as C
from lidit.cache.reader import CacheReader, batch_to_training_inputs
from lidit.generator import TextFeatures

Batch = dict[str, np.ndarray]


def training_columns(reader: CacheReader) -> list[str]:
    """The columns training reads (no source bookkeeping, no captions)."""
    cols = [C.COL_ID, C.COL_LATENT, C.COL_LATENT_HEIGHT, C.COL_LATENT_WIDTH]
    for name in reader.encoder_names:
        cols += [C.states_column(name), C.length_column(name)]
    return cols


def split_by_bucket(batch: Batch) -> dict[tuple[int, int], Batch]:
    """Rows of a numpy batch grouped by latent size."""
    keys = list(zip(batch[C.COL_LATENT_HEIGHT].tolist(), batch[C.COL_LATENT_WIDTH].tolist(), strict=True))
    if len(set(keys)) == 1:
        return {keys[0]: batch}
    groups: dict[tuple[int, int], list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return {k: {c: v[idx] for c, v in batch.items()} for k, idx in groups.items()}


def concat_batches(parts: list[Batch]) -> Batch:
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def take(batch: Batch, n: int) -> tuple[Batch, Batch]:
    return {c: v[:n] for c, v in batch.items()}, {c: v[n:] for c, v in batch.items()}


def bucketed_batches(
    shard: Any, per_worker: int, reader: CacheReader, start_epoch: int = 0, skip: int = 0
) -> Iterator[tuple[int, int, torch.Tensor, list[TextFeatures]]]:
    """Endless (epoch, position, latents, texts) batches of exactly `per_worker` rows of one bucket each.

    `shard` is a Ray Data iterator (`get_dataset_shard`). Rows wait in per-bucket buffers until a full batch
    of their bucket exists. `position` counts source batches consumed in the epoch so a resumed run can skip
    them; rows still buffered at a checkpoint are skipped on resume (none with a single bucket).
    """
    epoch = start_epoch
    while True:
        buffers: dict[tuple[int, int], Batch] = {}
        iterator = shard.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True)
        for pos, batch in enumerate(iterator):
            if epoch == start_epoch and pos < skip:
                continue
            for key, part in split_by_bucket(batch).items():
                pending = concat_batches([buffers[key], part]) if key in buffers else part
                while len(pending[C.COL_ID]) >= per_worker:
                    full, pending = take(pending, per_worker)
                    latents, texts, _ = batch_to_training_inputs(full, reader)
                    yield epoch, pos + 1, latents, texts
                buffers[key] = pending
        epoch += 1


def head_rows(reader: CacheReader, n: int) -> Any:
    """The first `n` rows of the first shard that share its first row's bucket (fixed prompts for sample grids), as an Arrow table."""
    paths = reader.shard_paths()
    if not paths:
        raise ValueError(f"cache {reader.uri} has no rows")
    table = pq.read_table(paths[0], filesystem=reader.filesystem)
    first = table.slice(0, 1)
    same = pc.and_(
        pc.equal(table[C.COL_LATENT_HEIGHT], first[C.COL_LATENT_HEIGHT][0]),
        pc.equal(table[C.COL_LATENT_WIDTH], first[C.COL_LATENT_WIDTH][0]),
    )
    return table.filter(same).slice(0, n)  # one bucket, so the rows batch together
