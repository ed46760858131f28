"""Read a feature cache without Ray: manifest, prefix states, shards as Arrow or torch batches.

    reader = CacheReader("s3://bucket/cache")            # latest committed version
    ds = ray.data.read_parquet(reader.shard_uris(), filesystem=reader.filesystem)   # in a Ray stage
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        latents, text, ids = batch_to_training_inputs(batch, reader)

`batch_to_training_inputs` accepts a pyarrow Table/RecordBatch or a dict of numpy arrays (what Ray Data's
`iter_batches(batch_format="numpy")` yields) and returns float32 latents and one `TextFeatures` per encoder,
in manifest order, built with the shared prefix. All rows of a batch must share a bucket (same latent size).
`batch_layout_targets` decodes a cache's per-token layout targets (`CacheReader.has_layout`) to match them,
and `batch_negatives` the states of its rows' negative captions (`CacheReader.has_negatives`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors

from lidit.cache import contract as C
from lidit.cache.storage import Location, open_location
from lidit.encoder import features_from_parts
from lidit.generator import HardNegatives, TextFeatures
from lidit.layout import LayoutTargets


class CacheNotFoundError(FileNotFoundError):
    """No committed cache version at the URI (or not the requested one)."""


def list_versions(loc: Location) -> list[int]:
    """Committed versions under a cache root, ascending."""
    mdir = loc.join(C.MANIFEST_DIR)
    if not loc.exists(mdir):
        return []
    out = []
    for p in loc.fs.ls(mdir, detail=False):
        m = C.MANIFEST_RE.match(p.rstrip("/").rsplit("/", 1)[-1])
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def load_manifest(loc: Location, version: int | None = None) -> C.Manifest | None:
    """The manifest of `version` (default latest) or None when the cache has no committed version."""
    versions = list_versions(loc)
    if not versions:
        return None
    v = versions[-1] if version is None else version
    if v not in versions:
        raise CacheNotFoundError(f"cache {loc.uri}: no version {v} (have {versions})")
    data = json.loads(loc.read_bytes(loc.join(C.manifest_name(v))))
    if data.get("contract_version") != C.CONTRACT_VERSION:
        raise ValueError(
            f"cache {loc.uri} v{v}: contract version {data.get('contract_version')}, "
            f"this code reads {C.CONTRACT_VERSION}"
        )
    return C.Manifest.model_validate(data)


def _column(batch: Any, name: str) -> list | np.ndarray:
    """A column of a pyarrow table/record batch or a dict of numpy arrays, as a list or array."""
    if isinstance(batch, pa.Table | pa.RecordBatch):
        if name not in batch.schema.names:
            raise KeyError(f"batch has no column {name!r}; columns: {batch.schema.names}")
        return batch.column(name).to_pylist()
    if name not in batch:
        raise KeyError(f"batch has no column {name!r}; columns: {list(batch)}")
    return batch[name]


def _num_rows(batch: Any) -> int:
    if isinstance(batch, pa.Table | pa.RecordBatch):
        return batch.num_rows
    return len(next(iter(batch.values())))


class CacheReader:
    """A committed cache version: manifest, encoders, prefix states, shards; no Ray needed."""

    def __init__(
        self, uri: str, version: int | None = None, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.location = open_location(uri, storage_options)
        manifest = load_manifest(self.location, version)
        if manifest is None:
            raise CacheNotFoundError(f"no committed feature cache at {self.location.uri}")
        self.manifest: C.Manifest = manifest

    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def encoder_names(self) -> list[str]:
        """Encoder names in manifest order (the order of `batch_to_training_inputs`' features)."""
        return [e.name for e in self.manifest.encoders]

    def encoder_config(self, name: str) -> dict:
        """`lidit.encoder.EncoderConfig` of encoder `name` as stored (JSON dict)."""
        return dict(self.manifest.encoder(name).config)

    @property
    def encoder_fingerprints(self) -> dict[str, str]:
        return {e.name: e.fingerprint for e in self.manifest.encoders}

    @property
    def vae_path(self) -> str:
        return self.manifest.vae.path

    @property
    def vae_fingerprint(self) -> str:
        return self.manifest.vae.fingerprint

    @property
    def num_rows(self) -> int:
        return self.manifest.rows

    @property
    def has_layout(self) -> bool:
        """Whether the shards carry per-token layout targets (`layout_<encoder>`: a build with grounded sources)."""
        return all(e.layout for e in self.manifest.encoders)

    @property
    def has_negatives(self) -> bool:
        """Whether the shards carry negative captions' states (a build with a source's negative_caption_column)."""
        return all(e.negatives for e in self.manifest.encoders)

    @cached_property
    def _prefixes(self) -> dict[str, torch.Tensor]:
        out = {}
        for e in self.manifest.encoders:
            tensors = load_safetensors(self.location.read_bytes(self.location.join(e.prefix_file)))
            out[e.name] = tensors[C.PREFIX_TENSOR]
        return out

    def prefix_states(self, name: str) -> torch.Tensor:
        """Shared prefix states (P, D) of encoder `name`, in the stored dtype."""
        self.manifest.encoder(name)  # clear KeyError for unknown names
        return self._prefixes[name]

    def shard_paths(self) -> list[str]:
        """Shard paths as `filesystem` expects them (no scheme)."""
        return [self.location.join(s.path) for s in self.manifest.shards]

    def shard_uris(self) -> list[str]:
        """Shard URIs (`s3://...` or absolute local paths) in manifest order."""
        return [self.location.uri_of(p) for p in self.shard_paths()]

    @property
    def filesystem(self):  # -> pyarrow.fs.FileSystem
        """pyarrow filesystem for `shard_paths()` / `shard_uris()` (pass to `ray.data.read_parquet`)."""
        return self.location.pyarrow_fs()

    def _read(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.location.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    def to_arrow(self, columns: list[str] | None = None) -> pa.Table:
        """All rows of this version as one Arrow table (shards in manifest order)."""
        schema = C.shard_schema(self.encoder_names, self.has_layout, self.has_negatives)
        tables = [self._read(p, columns) for p in self.shard_paths()]
        if not tables:
            names = columns or schema.names
            return pa.schema([schema.field(n) for n in names]).empty_table()
        return pa.concat_tables(tables)

    def quarantine(self) -> pa.Table:
        """The quarantined rows of this version, with their reasons."""
        tables = [self._read(self.location.join(s.quarantine_path)) for s in self.manifest.shards]
        return pa.concat_tables(tables) if tables else C.QUARANTINE_SCHEMA.empty_table()

    def iter_torch(
        self, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, list[TextFeatures], list[str]]]:
        """Batches of `batch_to_training_inputs` output; each batch holds one bucket (last ones may be short)."""
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        order = list(range(len(self.manifest.shards)))
        if shuffle:
            np.random.default_rng(seed).shuffle(order)
        pending: dict[str, list[pa.Table]] = {}
        counts: dict[str, int] = {}
        paths = self.shard_paths()
        for i in order:
            table = self._read(paths[i])
            if shuffle:
                table = table.take(np.random.default_rng(seed + i).permutation(table.num_rows))
            for bucket in sorted(set(table.column(C.COL_BUCKET).to_pylist())):
                part = table.filter(pa.compute.equal(table.column(C.COL_BUCKET), bucket))
                pending.setdefault(bucket, []).append(part)
                counts[bucket] = counts.get(bucket, 0) + part.num_rows
                while counts[bucket] >= batch_size:
                    merged = pa.concat_tables(pending[bucket])
                    yield batch_to_training_inputs(merged.slice(0, batch_size), self)
                    rest = merged.slice(batch_size)
                    pending[bucket], counts[bucket] = [rest], rest.num_rows
        for bucket, parts in pending.items():
            if counts[bucket]:
                yield batch_to_training_inputs(pa.concat_tables(parts), self)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (what `lidit cache info` prints): what a data engineer checks before training."""
        m = self.manifest
        total_bytes = sum(s.bytes for s in m.shards)
        v = m.vae
        return {
            "uri": self.uri,
            "version": m.version,
            "versions": list_versions(self.location),
            "rows": m.rows,
            "shards": len(m.shards),
            "bytes": total_bytes,
            "bytes_per_sample": total_bytes / m.rows if m.rows else 0.0,
            "encoders": {
                e.name: {
                    "path": e.config.get("path"),
                    "layer": e.config.get("layer"),
                    "instruction": e.config.get("instruction"),
                    "system_prompt": e.config.get("system_prompt"),
                    "max_length": e.config.get("max_length"),
                    "compute_dtype": e.config.get("dtype"),
                    "prefix_len": e.prefix_len,
                    "hidden_size": e.hidden_size,
                    "dtype": e.dtype,
                    "layout_targets": e.layout,
                    "negative_captions": e.negatives,
                    "fingerprint": e.fingerprint,
                }
                for e in m.encoders
            },
            "vae": {
                "path": v.path,
                "fingerprint": v.fingerprint,
                "dtype": v.dtype,
                "latent_channels": v.latent_channels,
                "scale": v.scale,
                # (C, H, W) of each bucket's latents
                "latent_shapes": {
                    f"{w}x{h}": [v.latent_channels, h // v.scale, w // v.scale] for w, h in m.image.buckets
                },
            },
            "buckets": [f"{w}x{h}" for w, h in m.image.buckets],
            "resolution": m.image.resolution,
            "sources": [s.uri for s in m.sources],
            "quarantine_counts": m.quarantine_counts,
            "created_at": m.created_at,
        }


def batch_to_training_inputs(
    batch: Any, reader: CacheReader
) -> tuple[torch.Tensor, list[TextFeatures], list[str]]:
    """Decode a batch of cache rows into (latents (B, C, H, W) float32, features per encoder, ids).

    `batch` is a pyarrow Table/RecordBatch or a dict of numpy arrays (Ray Data `batch_format="numpy"`).
    Features are float32 `TextFeatures` (shared prefix + prompt tokens), one per encoder in manifest order.
    """
    m = reader.manifest
    n = _num_rows(batch)
    if n == 0:
        raise ValueError("empty batch")
    ids = [str(x) for x in _column(batch, C.COL_ID)]
    heights = np.asarray(_column(batch, C.COL_LATENT_HEIGHT), dtype=np.int64)
    widths = np.asarray(_column(batch, C.COL_LATENT_WIDTH), dtype=np.int64)
    if (heights != heights[0]).any() or (widths != widths[0]).any():
        raise ValueError("batch mixes latent sizes (buckets); batch rows of one bucket together")
    shape = (m.vae.latent_channels, int(heights[0]), int(widths[0]))
    latents = torch.stack(
        [C.decode_tensor(b, m.vae.dtype, shape) for b in _column(batch, C.COL_LATENT)]
    ).float()
    features = []
    for e in m.encoders:
        lengths = [int(x) for x in _column(batch, C.length_column(e.name))]
        states = [
            C.decode_tensor(b, e.dtype, (n_tok, e.hidden_size)).float()
            for b, n_tok in zip(_column(batch, C.states_column(e.name)), lengths, strict=True)
        ]
        features.append(features_from_parts(reader.prefix_states(e.name).float(), states))
    return latents, features, ids


def batch_layout_targets(batch: Any, reader: CacheReader, texts: list[TextFeatures]) -> LayoutTargets:
    """The layout targets of a batch's prompt tokens, one entry per encoder in manifest order, padded like
    `texts` (that batch's `batch_to_training_inputs` features): padding is masked out, every real token is a
    target (0 where the caption states no place)."""
    if not reader.has_layout:
        raise ValueError(
            f"cache {reader.uri} has no layout targets: build it with a source's grounding_column set"
        )
    targets, masks = [], []
    for e, feats in zip(reader.manifest.encoders, texts, strict=True):
        mask = feats.mask[:, feats.prefix_len :]  # the prompt tokens, padded; a row's L = its count
        target = torch.zeros(*mask.shape, 2)
        for row, (b, n_tok) in enumerate(
            zip(_column(batch, C.layout_column(e.name)), mask.sum(1).tolist(), strict=True)
        ):
            target[row, :n_tok] = C.decode_tensor(b, C.LAYOUT_DTYPE, (n_tok, 2)).float()
        targets.append(target)
        masks.append(mask)
    return LayoutTargets(targets, masks)


def batch_negatives(batch: Any, reader: CacheReader) -> HardNegatives | None:
    """The hard negatives of a batch: which rows have a negative caption, and its features per encoder in
    manifest order (shared prefix + its prompt tokens, like `batch_to_training_inputs`); None when no row has
    one. Rows are ordered as in the batch."""
    if not reader.has_negatives:
        raise ValueError(
            f"cache {reader.uri} has no negative captions: build it with a source's negative_caption_column set"
        )
    encoders = reader.manifest.encoders
    lengths = {e.name: [int(x) for x in _column(batch, C.negative_length_column(e.name))] for e in encoders}
    rows = [i for i, n_tok in enumerate(lengths[encoders[0].name]) if n_tok > 0]
    if not rows:
        return None
    texts = []
    for e in encoders:
        blobs = _column(batch, C.negative_states_column(e.name))
        states = [
            C.decode_tensor(blobs[i], e.dtype, (lengths[e.name][i], e.hidden_size)).float() for i in rows
        ]
        texts.append(features_from_parts(reader.prefix_states(e.name).float(), states))
    return HardNegatives(torch.tensor(rows), texts)
