"""The feature cache contract: the one definition of what `pipelines/` writes and what training reads.

A cache is standard Parquet plus JSON and safetensors files under one root (a local directory or `s3://...`);
pyarrow, DuckDB or Polars read it without Ray. Everything below is versioned by `CONTRACT_VERSION`.

Layout of a cache root::

    manifests/v000001.json        one manifest per committed cache version (`Manifest`); the highest is latest
    shards/<unit>-<groups>.parquet       feature rows of one unit of source rows (`SHARD_SCHEMA` columns)
    shards/<unit>-<groups>.json          `ShardEntry` sidecar: written after the shard, marks the unit complete
    quarantine/<unit>-<groups>.parquet   rows that failed, with the reason (`QUARANTINE_SCHEMA`)
    prefix/<encoder>-<fingerprint>.safetensors   shared prefix states of one encoder, tensor `PREFIX_TENSOR`
    plan/dedupe-<key>.json        builder's memo of duplicate-id rows per source state (not read by readers)
    plan/tar-<key>.json           builder's memo of a WebDataset tar's sample count per file state (ditto)

Commit protocol: shard and quarantine files are written atomically (temp file + rename locally; one PUT on
S3, which makes an object visible only when complete), then the sidecar; the manifest is written last. A
reader only ever follows a manifest, so files of a killed build are invisible until a later build commits
them (it finds them by their deterministic names and reuses them: that is how a build resumes).

Shard columns (one row per sample, rows in source order):

- `id` (string): stable sample id from the source (`id` column, the image file's stem, or a tar sample's key).
- `caption` (string), `source` (string: source file URI), `source_row` (int64: row / file index in it).
- `width`, `height` (int32): original image size; `bucket` (string "WxH"), `bucket_width`,
  `bucket_height` (int32): pixel size after the aspect-ratio bucket resize + centre crop.
- `latent` (binary): VAE latent (C, H, W) as raw little-endian bytes of `manifest.vae.dtype`, C-contiguous,
  already scaled with `lidit.pipeline.vae_to_latents` (the distribution mean, not a sample). C is
  `manifest.vae.latent_channels`; H, W are the int32 columns `latent_height`, `latent_width`.
- per encoder `E` (in manifest order): `states_E` (binary): the prompt tokens' hidden states (L, D), prefix
  excluded, no padding, raw little-endian bytes of `manifest.encoders[i].dtype`; `length_E` (int32): L.
  D is `manifest.encoders[i].hidden_size`.
- per encoder `E` whose manifest entry has `layout: true` (a build with grounded sources): `layout_E`
  (binary): per prompt token its layout target (L, 2) float16, the same L tokens as `states_E`
  (`lidit.layout.grounding_targets`: the token's grounded object as an offset from the grounded objects'
  midpoint in quarter-image units, after the bucket crop; 0 for tokens and captions without a stated place).
- per encoder `E` whose manifest entry has `negatives: true` (a build with a source's `negative_caption_column`):
  `negative_states_E` (binary) and `negative_length_E` (int32): the same as `states_E` / `length_E` for the
  row's hard-negative caption (a caption the image does *not* show, e.g. every shape word swapped), and the
  base column `negative_caption` (string, null without one). A row without a negative caption has empty bytes
  and length 0: training skips it in the hard-negative term.

Half precision is stored exactly: the tensor's bits are the bytes. float16 decodes with
`numpy.frombuffer(b, numpy.float16)`; bfloat16 (no numpy dtype) with
`torch.frombuffer(bytearray(b), dtype=torch.uint16).view(torch.bfloat16)` (see `decode_tensor`).
The shared prefix (system prompt + instruction) states are stored once per encoder, (P, D) in the same
dtype; a training sample's text tokens are `prefix ++ states_E` (`lidit.encoder.features_from_parts`).

Quarantine columns: `id` (string, null when unknown), `source`, `source_row`, `reason` (one of
`QUARANTINE_REASONS`), `detail` (string).

Fingerprints: each column group has one. `latents` = VAE weights/config + latent dtype + image settings;
each encoder = `PromptEncoder.fingerprint` (weights, config, tokenizer, layer, prompt prefix, compute
dtype) + stored dtype. A unit of source rows is keyed by the source file's fingerprint (size + mtime locally,
size + ETag on S3), its row range, the ingest settings and its duplicate rows. A rebuild reuses a shard whose
unit and group fingerprints all match, and recomputes only the stale groups of a unit otherwise.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from lidit.config import StrictModel

if TYPE_CHECKING:  # torch is imported lazily: decode workers read this module without paying for torch
    import torch

CONTRACT_VERSION = 1
FORMAT_NAME = "lidit-feature-cache"

MANIFEST_DIR = "manifests"
SHARD_DIR = "shards"
QUARANTINE_DIR = "quarantine"
PREFIX_DIR = "prefix"
PLAN_DIR = "plan"
PREFIX_TENSOR = "prefix_states"
MANIFEST_RE = re.compile(r"^v(\d{6})\.json$")

# Column names: defined here only, imported everywhere.
COL_ID = "id"
COL_CAPTION = "caption"
COL_NEGATIVE_CAPTION = "negative_caption"  # only in caches whose encoders have `negatives: true`
COL_SOURCE = "source"
COL_SOURCE_ROW = "source_row"
COL_WIDTH = "width"
COL_HEIGHT = "height"
COL_BUCKET = "bucket"
COL_BUCKET_WIDTH = "bucket_width"
COL_BUCKET_HEIGHT = "bucket_height"
COL_LATENT = "latent"
COL_LATENT_HEIGHT = "latent_height"
COL_LATENT_WIDTH = "latent_width"
COL_REASON = "reason"
COL_DETAIL = "detail"

LATENT_GROUP = "latents"  # column-group name of the VAE latents in summaries and manifests

StoredDType = Literal["float16", "bfloat16", "float32"]
STORED_DTYPES = ("float16", "bfloat16", "float32")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a stored dtype name."""
    import torch

    if name not in STORED_DTYPES:
        raise ValueError(f"unknown stored dtype {name!r} (choose from {STORED_DTYPES})")
    return getattr(torch, name)


def _bits_dtype(name: str) -> torch.dtype:
    """Reinterpretation type of the raw bytes (bfloat16 has no numpy dtype: its bits travel as uint16)."""
    import torch

    return torch.uint16 if name == "bfloat16" else torch_dtype(name)


QUARANTINE_REASONS = (
    "missing_image",  # no image value / file for the row
    "wrong_type",  # the image value is not bytes (e.g. a string or a number)
    "empty_image",  # zero bytes
    "not_an_image",  # bytes no image decoder recognises
    "truncated",  # image data ends early
    "undecodable",  # recognised format but decoding failed
    "too_large",  # more pixels than `max_image_pixels` (decompression bombs) or a side too long
    "too_small",  # a side shorter than `min_image_side`
    "empty_caption",
    "caption_too_long",  # more prompt tokens than an encoder's max_length
    "missing_id",
    "duplicate_id",  # a later row with an id seen before (the first occurrence is kept)
    "bad_grounding",  # the grounding column's value is malformed or does not fit the caption
    "bad_negative_caption",  # the negative-caption value is not a string, or is longer than an encoder takes
)


def states_column(encoder: str) -> str:
    """Column of encoder `encoder`'s prompt-token states (binary, one (L, D) tensor per row)."""
    return f"states_{encoder}"


def length_column(encoder: str) -> str:
    """Column of encoder `encoder`'s prompt-token count L (int32)."""
    return f"length_{encoder}"


def layout_column(encoder: str) -> str:
    """Column of encoder `encoder`'s per-token layout targets (binary, one (L, 2) float16 tensor per row)."""
    return f"layout_{encoder}"


def negative_states_column(encoder: str) -> str:
    """Column of encoder `encoder`'s states of the row's negative caption (binary, (L, D); empty when none)."""
    return f"negative_states_{encoder}"


def negative_length_column(encoder: str) -> str:
    """Column of encoder `encoder`'s negative-caption token count L (int32; 0 when the row has none)."""
    return f"negative_length_{encoder}"


LAYOUT_DTYPE = "float16"  # layout targets are about +-2: float16 holds them to 1e-3


def shard_schema(encoders: list[str], layout: bool = False, negatives: bool = False) -> pa.Schema:
    """Arrow schema of a feature shard for encoders in manifest order (`layout`: with their layout targets;
    `negatives`: with the negative captions and their states)."""
    fields = [
        pa.field(COL_ID, pa.string(), nullable=False),
        pa.field(COL_CAPTION, pa.string(), nullable=False),
    ]
    if negatives:
        fields.append(pa.field(COL_NEGATIVE_CAPTION, pa.string()))
    fields += [
        pa.field(COL_SOURCE, pa.string(), nullable=False),
        pa.field(COL_SOURCE_ROW, pa.int64(), nullable=False),
        pa.field(COL_WIDTH, pa.int32(), nullable=False),
        pa.field(COL_HEIGHT, pa.int32(), nullable=False),
        pa.field(COL_BUCKET, pa.string(), nullable=False),
        pa.field(COL_BUCKET_WIDTH, pa.int32(), nullable=False),
        pa.field(COL_BUCKET_HEIGHT, pa.int32(), nullable=False),
        pa.field(COL_LATENT, pa.binary(), nullable=False),
        pa.field(COL_LATENT_HEIGHT, pa.int32(), nullable=False),
        pa.field(COL_LATENT_WIDTH, pa.int32(), nullable=False),
    ]
    for name in encoders:
        fields.append(pa.field(states_column(name), pa.binary(), nullable=False))
        fields.append(pa.field(length_column(name), pa.int32(), nullable=False))
        if layout:
            fields.append(pa.field(layout_column(name), pa.binary(), nullable=False))
        if negatives:
            fields.append(pa.field(negative_states_column(name), pa.binary(), nullable=False))
            fields.append(pa.field(negative_length_column(name), pa.int32(), nullable=False))
    return pa.schema(fields, metadata={b"lidit.contract_version": str(CONTRACT_VERSION).encode()})


QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field(COL_ID, pa.string()),
        pa.field(COL_SOURCE, pa.string(), nullable=False),
        pa.field(COL_SOURCE_ROW, pa.int64(), nullable=False),
        pa.field(COL_REASON, pa.string(), nullable=False),
        pa.field(COL_DETAIL, pa.string(), nullable=False),
    ]
)


def encode_tensor(t: torch.Tensor, dtype: str) -> bytes:
    """Raw little-endian bytes of `t` cast to the stored `dtype` (exact for a tensor already in it)."""
    import torch

    x = t.detach().to("cpu", torch_dtype(dtype)).contiguous()
    if dtype == "float16" and not torch.isfinite(x).all() and torch.isfinite(t).all():
        raise OverflowError("values overflow float16 when stored; set the stored dtype to bfloat16")
    return x.view(_bits_dtype(dtype)).numpy().tobytes()


def decode_tensor(data: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `encode_tensor`: a tensor of the stored dtype and `shape` (a copy, writable)."""
    import torch

    target = torch_dtype(dtype)
    count = int(np.prod(shape)) if shape else 1
    if len(data) != count * target.itemsize:
        raise ValueError(
            f"tensor bytes: expected {count * target.itemsize} for {shape} {dtype}, got {len(data)}"
        )
    if count == 0:
        return torch.zeros(shape, dtype=target)
    return torch.frombuffer(bytearray(data), dtype=_bits_dtype(dtype)).view(target).reshape(shape)


# ---- manifest (pydantic models, serialised as JSON) ----


class SourceEntry(StrictModel):
    """One source file (Parquet file, WebDataset tar, or one image folder) as ingested by this version."""

    uri: str
    format: Literal["parquet", "webdataset", "images"]
    fingerprint: str
    rows: int = Field(ge=0)


class VaeEntry(StrictModel):
    """The VAE the latents came from, and how latents are stored."""

    path: str
    fingerprint: str = Field(description="hash of the VAE directory (weights + config)")
    group_fingerprint: str = Field(description="fingerprint of the latents column group")
    latent_channels: int = Field(gt=0)
    scale: int = Field(gt=0, description="pixels per latent cell")
    scaling_factor: float
    shift_factor: float = 0.0
    latents_mean: list[float] | None = Field(None, description="per-channel mean (then shift_factor unused)")
    latents_std: list[float] | None = Field(None, description="per-channel std, with latents_mean")
    dtype: StoredDType = "float16"


class EncoderEntry(StrictModel):
    """One prompt encoder's stored states: config, fingerprints and the shared prefix file."""

    name: str
    config: dict = Field(description="lidit.encoder.EncoderConfig as JSON")
    fingerprint: str = Field(description="PromptEncoder.fingerprint")
    group_fingerprint: str = Field(description="fingerprint of this encoder's column group")
    hidden_size: int = Field(gt=0)
    prefix_len: int = Field(ge=0)
    dtype: StoredDType = "float16"
    prefix_file: str = Field(description="path of the prefix safetensors, relative to the cache root")
    prefix_sha256: str
    layout: bool = Field(False, description="the shards carry `layout_<name>` (grounded sources)")
    negatives: bool = Field(
        False, description="the shards carry `negative_states_<name>` (sources with negative captions)"
    )


class ShardEntry(StrictModel):
    """One committed shard (also its sidecar JSON): where, how many rows, checksum, what it holds."""

    path: str = Field(description="relative to the cache root")
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str
    unit: str = Field(description="key of the unit of source rows this shard holds")
    source: str
    groups: dict[str, str] = Field(description="column group -> its fingerprint")
    quarantine_path: str
    quarantine_rows: int = Field(ge=0)
    quarantine_counts: dict[str, int] = Field(default_factory=dict)


class ImageSettings(StrictModel):
    """How images became bucket-sized pixels (part of the latents fingerprint)."""

    resolution: int
    buckets: list[tuple[int, int]]
    max_image_pixels: int
    min_image_side: int


class Manifest(StrictModel):
    """One committed cache version (`manifests/vNNNNNN.json`)."""

    format: Literal["lidit-feature-cache"] = FORMAT_NAME
    contract_version: int = CONTRACT_VERSION
    version: int = Field(ge=1)
    created_at: str
    rows: int = Field(ge=0)
    sources: list[SourceEntry]
    image: ImageSettings
    vae: VaeEntry
    encoders: list[EncoderEntry] = Field(min_length=1)
    shards: list[ShardEntry]
    quarantine_counts: dict[str, int] = Field(default_factory=dict)
    build: dict = Field(default_factory=dict, description="summary of the build that committed it")

    def encoder(self, name: str) -> EncoderEntry:
        """The entry of encoder `name` (KeyError with the known names otherwise)."""
        for e in self.encoders:
            if e.name == name:
                return e
        raise KeyError(f"encoder {name!r} not in cache; encoders: {[e.name for e in self.encoders]}")

    def content_key(self) -> dict:
        """What identifies the cache's content (everything but version, time and build stats)."""
        return self.model_dump(mode="json", exclude={"version", "created_at", "build"})


def manifest_name(version: int) -> str:
    return f"{MANIFEST_DIR}/v{version:06d}.json"


def sidecar_name(shard_name: str) -> str:
    """Path (relative to the root) of the `ShardEntry` sidecar that marks shard `shard_name` complete."""
    return f"{SHARD_DIR}/{shard_name}.json"
