"""Training data order: per-epoch shuffle, disjoint ranks, carried rare-bucket rows, equal step counts, resume.

Most tests drive `training.data` directly, in-process, on a cache derived from the micro cache: its rows
spread over several latent sizes (buckets, one too small to ever fill a batch) in tiny shards of several row
groups. One test runs a short 2-worker `run_training` on such a cache: before this module's design, a rank
whose buckets ran out first moved on to its next epoch and waited at Ray Data's split barrier while the other
waited in an all-reduce, so that run hung.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lidit.cache import contract as C
from lidit.cache.reader import CacheReader
from training.data import CacheIndex, bucketed_batches, epoch_plans, rank_batch_tables

# (latent height, latent width, rows): a common bucket, two smaller ones, a rare one that fills exactly one
# global batch of 8 plus 3 carried rows, and one with fewer rows than a batch (never trainable).
BUCKETS = [(16, 16, 110), (16, 8, 50), (8, 16, 31), (8, 8, 11), (12, 12, 5)]
PER_WORKER, WORLD = 4, 2
SEED = 11


def derive_cache(
    src_uri: str, out: Path, buckets: list[tuple[int, int, int]], shard_rows: int, group_rows: int
) -> str:
    """A committed cache with the source's rows re-bucketed (latents cropped) into tiny multi-row-group shards.

    Row `i` goes to the bucket its position falls in (after a fixed shuffle, so buckets interleave in the
    shards as real aspect-ratio buckets do). Manifest, prefix states, encoders and VAE come from the source.
    """
    src = CacheReader(src_uri)
    m = src.manifest
    total = sum(n for _, _, n in buckets)
    table = src.to_arrow().slice(0, total)
    assert table.num_rows == total, "source cache too small for these buckets"
    sizes = np.concatenate([[i] * n for i, (_, _, n) in enumerate(buckets)])
    sizes = sizes[np.random.default_rng(0).permutation(total)]
    c = m.vae.latent_channels
    assert all(
        h <= m.image.resolution // m.vae.scale and w <= m.image.resolution // m.vae.scale
        for h, w, _ in buckets
    )
    latents, heights, widths = [], [], []
    for row, bucket in zip(table.to_pylist(), sizes.tolist(), strict=True):
        h, w, _ = buckets[bucket]
        full = C.decode_tensor(
            row[C.COL_LATENT], m.vae.dtype, (c, row[C.COL_LATENT_HEIGHT], row[C.COL_LATENT_WIDTH])
        )
        latents.append(C.encode_tensor(full[:, :h, :w], m.vae.dtype))
        heights.append(h)
        widths.append(w)
    scale = m.vae.scale
    replace = {
        C.COL_LATENT: pa.array(latents, pa.binary()),
        C.COL_LATENT_HEIGHT: pa.array(heights, pa.int32()),
        C.COL_LATENT_WIDTH: pa.array(widths, pa.int32()),
        C.COL_BUCKET_HEIGHT: pa.array([h * scale for h in heights], pa.int32()),
        C.COL_BUCKET_WIDTH: pa.array([w * scale for w in widths], pa.int32()),
        C.COL_BUCKET: pa.array([f"{w * scale}x{h * scale}" for h, w in zip(heights, widths, strict=True)]),
    }
    for name, column in replace.items():
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), column)

    for sub in (C.SHARD_DIR, C.QUARANTINE_DIR, C.MANIFEST_DIR):
        (out / sub).mkdir(parents=True)
    shutil.copytree(Path(src.location.path) / C.PREFIX_DIR, out / C.PREFIX_DIR)
    quarantine = f"{C.QUARANTINE_DIR}/none.parquet"
    pq.write_table(C.QUARANTINE_SCHEMA.empty_table(), out / quarantine)
    template = m.shards[0]
    shards = []
    for k, start in enumerate(range(0, total, shard_rows)):
        path = f"{C.SHARD_DIR}/derived-{k:04d}.parquet"
        pq.write_table(table.slice(start, shard_rows), out / path, row_group_size=group_rows)
        data = (out / path).read_bytes()
        shards.append(
            template.model_copy(
                update={
                    "path": path,
                    "rows": min(shard_rows, total - start),
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "unit": f"derived-{k:04d}",
                    "quarantine_path": quarantine,
                    "quarantine_rows": 0,
                    "quarantine_counts": {},
                }
            )
        )
    manifest = m.model_copy(update={"version": 1, "rows": total, "shards": shards, "quarantine_counts": {}})
    (out / C.manifest_name(1)).write_text(manifest.model_dump_json(indent=1))
    return str(out)


@pytest.fixture(scope="module")
def bucket_cache(micro_cache: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """207 rows in 5 buckets, shards of 9 rows in row groups of 4 (69 blocks)."""
    return derive_cache(micro_cache, tmp_path_factory.mktemp("buckets") / "cache", BUCKETS, 9, 4)


def _ids(
    cache: str, rank: int, world: int = WORLD, seed: int = SEED, start_epoch: int = 0, skip: int = 0, **kw
) -> Iterator[tuple[int, int, list[str], tuple[int, int]]]:
    """(epoch, position, ids, latent size) of one rank's batches."""
    reader = CacheReader(cache)
    for epoch, position, table in rank_batch_tables(
        reader, PER_WORKER, rank, world, seed, start_epoch, skip, shuffle_rows=40, **kw
    ):
        sizes = set(
            zip(table[C.COL_LATENT_HEIGHT].to_pylist(), table[C.COL_LATENT_WIDTH].to_pylist(), strict=True)
        )
        assert len(sizes) == 1, f"a batch mixes buckets: {sizes}"
        yield epoch, position, table[C.COL_ID].to_pylist(), sizes.pop()


def _epochs(cache: str, rank: int, epochs: int, **kw) -> list[list[list[str]]]:
    """Batches (as id lists) of each of the first `epochs` epochs of one rank."""
    out: list[list[list[str]]] = [[] for _ in range(epochs)]
    for epoch, _, ids, _ in _ids(cache, rank, **kw):
        if epoch >= epochs:
            break
        out[epoch].append(ids)
    return out


@pytest.fixture(scope="module")
def three_epochs(bucket_cache: str) -> dict[int, list[list[list[str]]]]:
    """Three epochs of both ranks of a 2-rank world."""
    return {rank: _epochs(bucket_cache, rank, 3) for rank in range(WORLD)}


def test_epochs_reorder_and_seed_replays(bucket_cache: str, three_epochs: dict) -> None:
    rank0 = three_epochs[0]
    flat = [sum(epoch, []) for epoch in rank0]
    assert flat[0] != flat[1] != flat[2]
    assert set(flat[0]) != set(flat[1])  # not only reordered: rank 0 trains other rows, like a global shuffle
    assert _epochs(bucket_cache, 0, 1) == rank0[:1]  # (seed, epoch) alone decides the order
    assert _epochs(bucket_cache, 0, 1, seed=SEED + 1) != rank0[:1]
    # Order follows the shuffle, not the cache: ids of the first batches are not in source order.
    assert flat[0][:8] != sorted(flat[0][:8])


def test_ranks_take_equal_steps_on_disjoint_rows(three_epochs: dict) -> None:
    for epoch in range(3):
        per_rank = [three_epochs[rank][epoch] for rank in range(WORLD)]
        assert len({len(batches) for batches in per_rank}) == 1, f"epoch {epoch}: unequal step counts"
        seen = [{i for batch in batches for i in batch} for batches in per_rank]
        assert sum(len(s) for s in seen) == sum(len(b) for batches in per_rank for b in batches)
        assert not seen[0] & seen[1], f"epoch {epoch}: ranks share rows"


def test_every_trainable_row_is_trained_within_two_epochs(bucket_cache: str, three_epochs: dict) -> None:
    reader = CacheReader(bucket_cache)
    table = reader.to_arrow([C.COL_ID, C.COL_LATENT_HEIGHT, C.COL_LATENT_WIDTH])
    small = {(h, w) for h, w, n in BUCKETS if n < PER_WORKER * WORLD}
    trainable = {
        i
        for i, h, w in zip(*(table[c].to_pylist() for c in table.column_names), strict=True)
        if (h, w) not in small
    }
    trained = [
        {i for rank in range(WORLD) for batch in three_epochs[rank][epoch] for i in batch}
        for epoch in range(3)
    ]
    for epoch in range(2):
        missing = trainable - trained[epoch] - trained[epoch + 1]
        assert not missing, f"epochs {epoch}-{epoch + 1} never trained {len(missing)} rows"
    assert trained[0] | trained[1] | trained[2] <= trainable  # a too-small bucket is carried, never trained
    assert any(len(t) < len(trainable) for t in trained)  # some rows really were carried over


def test_resume_at_any_position_replays_the_stream(bucket_cache: str) -> None:
    straight = list(islice(_ids(bucket_cache, 1), 80))  # past two epoch ends (about 24 batches each)
    ends = [k for k in range(len(straight) - 1) if straight[k + 1][0] != straight[k][0]]
    for cut in [0, 5, ends[0], ends[0] + 1, ends[1] + 3]:
        epoch, position = straight[cut][:2]
        resumed = list(islice(_ids(bucket_cache, 1, start_epoch=epoch, skip=position), 12))
        assert resumed == straight[cut + 1 : cut + 13], (
            f"resume after batch {cut} (epoch {epoch}, {position})"
        )
    # Reading ahead on threads or not, the same rows in the same order.
    assert list(islice(_ids(bucket_cache, 1, read_ahead=0), 30)) == straight[:30]


def test_bucketed_batches_decode_one_bucket_per_batch(bucket_cache: str) -> None:
    reader = CacheReader(bucket_cache)
    channels = reader.manifest.vae.latent_channels
    got = list(islice(bucketed_batches(reader, PER_WORKER, 0, WORLD, SEED), 30))
    shapes = {tuple(batch.latents.shape) for batch in got}
    assert len(shapes) >= 3  # several buckets come through, each batch whole
    for batch in got:
        assert batch.latents.shape[:2] == (PER_WORKER, channels)
        assert [t.states.shape[0] for t in batch.texts] == [PER_WORKER] * len(reader.encoder_names)
        assert batch.layout is None and len(batch.ids) == PER_WORKER


def test_layout_targets_come_padded_like_the_prompt_states(micro_cache: str) -> None:
    """The micro cache is grounded (tests/conftest.py): its relation captions' tokens carry places."""
    reader = CacheReader(micro_cache)
    assert reader.has_layout
    batches = bucketed_batches(reader, 8, 0, 1, SEED, layout=True)
    placed = 0
    for batch in islice(batches, 6):
        assert batch.layout is not None and len(batch.layout.targets) == len(reader.encoder_names)
        for texts, targets, mask in zip(batch.texts, batch.layout.targets, batch.layout.mask, strict=True):
            assert targets.shape == (8, texts.states.shape[1] - texts.prefix_len, 2)
            assert mask.equal(texts.mask[:, texts.prefix_len :])
            assert targets[~mask].abs().sum() == 0
            placed += int((targets.abs().sum(-1) > 0).any(-1).sum())
    batches.close()
    assert placed > 0


def test_index_reports_untrainable_buckets(bucket_cache: str) -> None:
    index = CacheIndex.build(CacheReader(bucket_cache))
    assert index.num_rows == sum(n for _, _, n in BUCKETS) and index.num_blocks == 69
    (warning,) = index.check(PER_WORKER * WORLD)
    assert "12x12: 5" in warning
    assert index.check(4) == []
    with pytest.raises(ValueError, match="no bucket"):
        index.check(111)
    with pytest.raises(ValueError, match="no bucket"):
        next(epoch_plans(index, 111, SEED))


# The old data path hung here (seen: still waiting after 13 min; this run takes 1-2 min). The signal method
# cannot break Ray's blocking get, so on a hang the thread method dumps stacks and ends the session.
@pytest.mark.timeout(600, method="thread", func_only=True)
@pytest.mark.usefixtures("ray_local")
def test_many_bucket_tiny_shard_two_worker_run_finishes(micro_cache: str, tmp_path: Path) -> None:
    from training.config import TrainConfig
    from training.train import run_training

    # 8 rows per global batch: 2 + 1 + 1 batches an epoch, and one bucket (1 row) that never fills. With
    # this layout the old split (contiguous halves) gave the ranks 4 and 3 batches an epoch: it hung.
    buckets = [(16, 16, 20), (8, 16, 10), (16, 8, 9), (8, 8, 1)]
    cfg = TrainConfig.model_validate(
        {
            "cache": derive_cache(micro_cache, tmp_path / "cache", buckets, 3, 2),
            "name": "buckets",
            "storage_path": str(tmp_path / "runs"),
            "steps": 12,
            "batch_size": PER_WORKER * WORLD,
            "scale": {"workers": WORLD},
            "optim": {"warmup_steps": 2},
            "checkpoint": {"every": 12},
            "tracking": {
                "experiment": "test-train-data",
                "registered_model": None,
                "num_samples": 0,
                "log_every": 4,
            },
        }
    )
    summary = run_training(cfg)
    assert summary["steps"] == 12
    epochs = mlflow.MlflowClient().get_metric_history(summary["mlflow_run_id"], "epoch")
    assert max(m.value for m in epochs) >= 2  # crossed epoch ends, where ranks used to fall out of step
