"""Cache -> training batches: a deterministic per-epoch plan of one-bucket global batches, and per-rank reading.

Why a plan of our own and not Ray Data's `streaming_split`: FSDP needs every rank to take the same number of
steps, and a batch must hold one bucket (latent size). With a split, no rank knows which rows (so which
buckets) the others received, so the ranks cannot agree on a step count without collectives; a rank that
runs out of full batches and starts its next epoch blocks at the split's epoch barrier while the others wait
in an all-reduce (the hang this module used to have). Ray Data's seeded shuffles (`RandomSeedConfig`) reseed
by the dataset's execution count, which restarts at 0 in a resumed or restarted run, so a resumed run would
not see the order an uninterrupted one sees. So every rank computes the same plan from metadata alone (each
row's bucket and where it lives), takes its slice of every global batch, and reads its rows with pyarrow.

The plan of epoch `e`, from `(seed, e)` and the rows the previous epoch left over (`carry`):

1. block-order randomisation: the blocks (Parquet row groups) in a random order;
2. a local shuffle: consecutive blocks are grouped into windows of about `shuffle_rows` rows and the rows
   of each window are permuted (what `iter_batches(local_shuffle_buffer_size=...)` does, but seeded per
   epoch and resumable);
3. the stream is the carried rows first, then those windows, each row once; per bucket, every run of
   `per_worker * world` rows in stream order is a global batch, ordered by where its last row is;
4. rank `r` takes rows `[r * per_worker, (r + 1) * per_worker)` of each global batch. A bucket's last
   partial batch is carried: its rows open the next epoch (they are not in that epoch's stream again).

So within an epoch no row is trained twice and ranks never share a row; every rank takes the same number of
steps; a row of a bucket with at least `per_worker * world` rows is trained in its epoch or the next (the
carry of a bucket is smaller than one batch and opens the bucket's first batch of the next epoch). Rows of
a bucket with fewer rows than one global batch can never be trained in one-bucket batches (`CacheIndex.check`
says so before training). Position in an epoch = global batches consumed; the plan of an epoch depends only
on the seed and the epochs before it, so resuming at (epoch, position) replays an uninterrupted run exactly.

Cost: every rank reads every block of the epoch (it keeps and decodes only its own rows), so read volume is
`world` times the cache per epoch; fine for this project's caches, the first thing to change for a large
cache on S3 (e.g. one reader actor serving the slices). Reads run `read_ahead` blocks ahead on threads.
Planning is metadata-only (about 0.3 s per epoch per million rows here); a resume at epoch `e` plans the `e`
epochs before it to know their carry, instead of checkpointing it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from lidit.cache import contract as C
from lidit.cache.reader import CacheReader, batch_layout_targets, batch_negatives, batch_to_training_inputs
from lidit.generator import HardNegatives, TextFeatures
from lidit.layout import LayoutTargets

SHUFFLE_ROWS = 4096  # rows per shuffle window: the memory of a local shuffle buffer, per rank ~ this / world
READ_AHEAD = 2  # blocks read ahead of need on background threads (pyarrow releases the GIL)
INDEX_THREADS = 8  # parallel shard footers + bucket columns when indexing (latency-bound on S3)


def training_columns(reader: CacheReader, layout: bool = False, negatives: bool = False) -> list[str]:
    """The columns training reads (no source bookkeeping, no captions; `layout`: the layout targets too;
    `negatives`: the negative captions' states too)."""
    cols = [C.COL_ID, C.COL_LATENT, C.COL_LATENT_HEIGHT, C.COL_LATENT_WIDTH]
    for name in reader.encoder_names:
        cols += [C.states_column(name), C.length_column(name)]
        if layout:
            cols.append(C.layout_column(name))
        if negatives:
            cols += [C.negative_states_column(name), C.negative_length_column(name)]
    return cols


class TrainingBatch(NamedTuple):
    """One rank's batch of one step, and where it leaves the epoch (pass back to resume)."""

    epoch: int
    position: int
    latents: torch.Tensor
    texts: list[TextFeatures]  # one per encoder, manifest order
    layout: LayoutTargets | None  # the same order; None unless asked for
    ids: list[str]
    negatives: HardNegatives | None = None  # the same order; None unless asked for or no row has one


@dataclass(frozen=True, eq=False)
class CacheIndex:
    """Where each row of a cache version lives and which bucket it is in: what planning needs, no features.

    Rows are numbered globally in manifest order (shard by shard, row group by row group). A block is one
    Parquet row group: the unit of reading and of block-order randomisation.
    """

    paths: list[str]  # shard paths for `reader.location.fs`
    block_shard: np.ndarray  # (num_blocks,) shard of each block
    block_group: np.ndarray  # (num_blocks,) row group of each block within its shard
    block_start: np.ndarray  # (num_blocks + 1,) first global row of each block; the last entry is num_rows
    bucket: np.ndarray  # (num_rows,) bucket id of each row
    bucket_sizes: tuple[tuple[int, int], ...]  # (latent_height, latent_width) of each bucket id

    @classmethod
    def build(cls, reader: CacheReader) -> CacheIndex:
        """Read shard footers and the two latent-size columns of every shard (a few bytes per row)."""
        paths = reader.shard_paths()

        def scan(path: str) -> tuple[list[int], np.ndarray]:
            with reader.location.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                groups = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
                t = pf.read(columns=[C.COL_LATENT_HEIGHT, C.COL_LATENT_WIDTH])
            hw = np.stack([t.column(0).to_numpy(), t.column(1).to_numpy()], axis=1).astype(np.int64)
            return groups, hw.reshape(-1, 2)

        with ThreadPoolExecutor(INDEX_THREADS) as pool:
            scanned = list(pool.map(scan, paths))
        shard, group, sizes, hws = [], [], [], []
        for s, (groups, hw) in enumerate(scanned):
            shard += [s] * len(groups)
            group += list(range(len(groups)))
            sizes += groups
            hws.append(hw)
        block_start = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        hw = np.concatenate(hws) if hws else np.zeros((0, 2), np.int64)
        keys, bucket = np.unique(hw, axis=0, return_inverse=True)
        return cls(
            paths=paths,
            block_shard=np.asarray(shard, np.int64),
            block_group=np.asarray(group, np.int64),
            block_start=block_start,
            bucket=bucket.reshape(-1).astype(np.int64),
            bucket_sizes=tuple((int(h), int(w)) for h, w in keys),
        )

    @property
    def num_rows(self) -> int:
        return int(self.block_start[-1])

    @property
    def num_blocks(self) -> int:
        return len(self.block_shard)

    def bucket_counts(self) -> np.ndarray:
        """Rows per bucket id."""
        return np.bincount(self.bucket, minlength=len(self.bucket_sizes))

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        """Block of each global row."""
        return np.searchsorted(self.block_start, rows, side="right") - 1

    def check(self, global_batch: int) -> list[str]:
        """Warnings for buckets too small to ever fill a global batch; ValueError when none can."""
        counts = self.bucket_counts()
        if not len(counts) or counts.max() < global_batch:
            raise ValueError(
                f"no bucket (latent size) has batch_size={global_batch} rows "
                f"(rows per bucket: {self._describe(counts)}); lower batch_size or add data"
            )
        small = counts < global_batch
        if not small.any():
            return []
        return [
            f"{int(counts[small].sum())} rows in buckets with fewer than batch_size={global_batch} rows are "
            f"never trained (one-bucket batches): {self._describe(counts, small)}"
        ]

    def _describe(self, counts: np.ndarray, only: np.ndarray | None = None) -> str:
        return ", ".join(
            f"{h}x{w}: {int(n)}"
            for i, ((h, w), n) in enumerate(zip(self.bucket_sizes, counts, strict=True))
            if only is None or only[i]
        )


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """One epoch's global batches (rank `r` takes columns `[r * per_worker, (r + 1) * per_worker)`)."""

    epoch: int
    batches: np.ndarray  # (K, per_worker * world) global rows, each batch one bucket
    carry: np.ndarray  # rows of partial batches, in stream order: they open the next epoch


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The data-order generator of one epoch (a pure function of (seed, epoch), so resume replays it)."""
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, epoch]))


def plan_epoch(
    index: CacheIndex, global_batch: int, seed: int, epoch: int, carry: np.ndarray, shuffle_rows: int
) -> EpochPlan:
    """The global batches of `epoch`: block order, windowed row shuffle, carried rows first, then per bucket."""
    if index.bucket_counts().max(initial=0) < global_batch:
        index.check(global_batch)  # raises with the bucket sizes
    rng = epoch_rng(seed, epoch)
    order = rng.permutation(index.num_blocks)
    starts = index.block_start[order]
    sizes = index.block_start[order + 1] - starts
    offsets = np.cumsum(sizes) - sizes  # (blocks,) first stream offset of each block
    rows = np.arange(int(sizes.sum())) - np.repeat(offsets, sizes) + np.repeat(starts, sizes)
    window = np.repeat(offsets // max(1, shuffle_rows), sizes)  # whole blocks per window
    fresh = np.ones(index.num_rows, dtype=bool)
    fresh[carry] = False  # a carried row is this epoch's occurrence of it
    keep = fresh[rows]
    rows, window = rows[keep], window[keep]
    rows = rows[np.argsort(window + rng.random(len(rows)), kind="stable")]  # windows stay in order
    stream = np.concatenate([carry.astype(np.int64), rows])  # (num_rows,) each row once

    keys = index.bucket[stream]
    by_bucket = np.argsort(keys, kind="stable")  # stream positions, grouped by bucket, in stream order
    counts = np.bincount(keys, minlength=len(index.bucket_sizes))
    full, rest, start = [], [], 0
    for n in counts:
        positions = by_bucket[start : start + n]
        start += n
        k = n // global_batch
        full.append(positions[: k * global_batch].reshape(k, global_batch))
        rest.append(positions[k * global_batch :])
    batches = np.concatenate(full)  # (K, global_batch) stream positions
    batches = batches[np.argsort(batches[:, -1])]  # in the order the stream completes them
    return EpochPlan(epoch=epoch, batches=stream[batches], carry=stream[np.sort(np.concatenate(rest))])


def epoch_plans(
    index: CacheIndex, global_batch: int, seed: int, shuffle_rows: int = SHUFFLE_ROWS, start_epoch: int = 0
) -> Iterator[EpochPlan]:
    """Plans of `start_epoch`, `start_epoch + 1`, ...; earlier epochs are planned (not read) for their carry."""
    carry = np.zeros(0, np.int64)
    epoch = 0
    while True:
        plan = plan_epoch(index, global_batch, seed, epoch, carry, shuffle_rows)
        if epoch >= start_epoch:
            yield plan
        carry, epoch = plan.carry, epoch + 1


class RowStore:
    """The rows this rank still needs, taken out of their blocks when a block is read.

    `expect` registers rows in the order they will be needed; blocks are read in the order of first need,
    `read_ahead` of them in flight on threads. A read keeps every expected row of the block, so a block is
    read once for all the rows expected from it so far.
    """

    def __init__(
        self, reader: CacheReader, index: CacheIndex, columns: list[str], read_ahead: int = READ_AHEAD
    ) -> None:
        self.reader, self.index, self.columns, self.read_ahead = reader, index, columns, read_ahead
        self.blocks_read = 0  # for tests and diagnostics
        self._wanted = np.zeros(index.num_rows, dtype=bool)
        self._rows: dict[int, tuple[pa.Table, int]] = {}
        self._schedule: deque[int] = deque()
        self._scheduled: set[int] = set()
        self._inflight: dict[int, Future[pa.Table]] = {}
        self._pool = ThreadPoolExecutor(read_ahead, thread_name_prefix="lidit-read") if read_ahead else None

    def expect(self, rows: np.ndarray) -> None:
        """Rows needed later, in order of need (rows already held are skipped)."""
        rows = np.asarray([r for r in rows.tolist() if r not in self._rows], dtype=np.int64)
        self._wanted[rows] = True
        blocks = self.index.block_of(rows)
        _, first = np.unique(blocks, return_index=True)
        for block in blocks[np.sort(first)].tolist():
            if block not in self._scheduled:
                self._schedule.append(block)
                self._scheduled.add(block)
        self._prefetch()

    def take(self, rows: np.ndarray) -> pa.Table:
        """The rows (expected earlier) as one Arrow table, in the given order; they are released."""
        for row in rows.tolist():
            if row not in self._rows:
                if not self._wanted[row]:
                    raise KeyError(f"row {row} was not expected")
                self._load(int(self.index.block_of(np.asarray([row]))[0]))
        parts = [self._rows.pop(row) for row in rows.tolist()]
        return pa.concat_tables([table.slice(j, 1) for table, j in parts])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _read(self, block: int) -> pa.Table:
        path = self.index.paths[int(self.index.block_shard[block])]
        with self.reader.location.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read_row_group(int(self.index.block_group[block]), columns=self.columns)

    def _prefetch(self) -> None:
        if self._pool is None:
            return
        for block in list(self._schedule)[: self.read_ahead]:
            if block not in self._inflight:
                self._inflight[block] = self._pool.submit(self._read, block)

    def _load(self, block: int) -> None:
        future = self._inflight.pop(block, None)
        table = future.result() if future is not None else self._read(block)
        self.blocks_read += 1
        if block in self._scheduled:
            self._scheduled.discard(block)
            self._schedule.remove(block)
        start = int(self.index.block_start[block])
        local = np.flatnonzero(self._wanted[start : int(self.index.block_start[block + 1])])
        kept = table.take(pa.array(local))
        for j, i in enumerate(local.tolist()):
            self._rows[start + i] = (kept, j)
        self._wanted[start + local] = False
        self._prefetch()


def rank_batch_tables(
    reader: CacheReader,
    per_worker: int,
    rank: int,
    world: int,
    seed: int,
    start_epoch: int = 0,
    skip: int = 0,
    *,
    shuffle_rows: int = SHUFFLE_ROWS,
    read_ahead: int = READ_AHEAD,
    index: CacheIndex | None = None,
    layout: bool = False,
    negatives: bool = False,
) -> Iterator[tuple[int, int, pa.Table]]:
    """Endless (epoch, position, rows) of rank `rank`: its `per_worker` rows of each global batch, as Arrow.

    `position` is the number of global batches of `epoch` consumed once this one is: pass the last
    (epoch, position) back as (start_epoch, skip) to resume exactly where a run stopped.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    index = index or CacheIndex.build(reader)
    lo, hi = rank * per_worker, (rank + 1) * per_worker
    store = RowStore(reader, index, training_columns(reader, layout, negatives), read_ahead)
    plans = epoch_plans(index, per_worker * world, seed, shuffle_rows, start_epoch)
    plan, first = next(plans), skip
    if skip > len(plan.batches):
        raise ValueError(f"position {skip} is past the {len(plan.batches)} batches of epoch {start_epoch}")
    try:
        while True:
            following = next(plans)
            mine = plan.batches[first:, lo:hi]
            # Carried rows are read in this epoch (their blocks are in it) but trained in the next.
            coming = following.batches[:, lo:hi].reshape(-1)
            store.expect(np.concatenate([mine.reshape(-1), coming[np.isin(coming, plan.carry)]]))
            for k, rows in enumerate(mine, start=first):
                yield plan.epoch, k + 1, store.take(rows)
            plan, first = following, 0
    finally:
        store.close()


def bucketed_batches(
    reader: CacheReader,
    per_worker: int,
    rank: int,
    world: int,
    seed: int,
    start_epoch: int = 0,
    skip: int = 0,
    layout: bool = False,
    negatives: bool = False,
    **options: Any,
) -> Iterator[TrainingBatch]:
    """Endless batches of `per_worker` rows of one bucket for one rank (`layout`: with their layout targets;
    `negatives`: with their rows' negative captions).

    Every rank of a world gets the same number of batches per epoch (one slice of each global batch), so
    the training loop's one `next()` per step never waits on data another rank lacks. See the module
    docstring for the order; `options` go to `rank_batch_tables`.
    """
    for epoch, position, table in rank_batch_tables(
        reader,
        per_worker,
        rank,
        world,
        seed,
        start_epoch,
        skip,
        layout=layout,
        negatives=negatives,
        **options,
    ):
        latents, texts, ids = batch_to_training_inputs(table, reader)
        targets = batch_layout_targets(table, reader, texts) if layout else None
        hard = batch_negatives(table, reader) if negatives else None
        yield TrainingBatch(epoch, position, latents, texts, targets, ids, hard)


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
