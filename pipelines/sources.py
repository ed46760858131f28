"""Source discovery and reading: Parquet datasets, WebDataset tars and image folders (local or s3://), split
into units.

A *unit* is a contiguous range of rows of one source file (a Parquet file, a tar, or one image folder's sorted
image list); each unit becomes one shard. Units are keyed by content, so unchanged files map to unchanged shards.
"""

from __future__ import annotations

import json
import posixpath
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from lidit.cache import contract as C
from lidit.cache.storage import Location, file_fingerprint, open_location
from lidit.config import ConfigError, StrictModel
from lidit.fingerprint import hash_json
from pipelines import webdataset

if TYPE_CHECKING:
    from pipelines.tasks import RowRange


class SourceConfig(StrictModel):
    """A Parquet dataset (file or folder), WebDataset tars (a .tar or a folder of them) or an image folder with
    sidecar caption files; local or s3://."""

    uri: str = Field(min_length=1)
    format: Literal["auto", "parquet", "webdataset", "images"] = Field(
        "auto",
        description="auto: *.parquet file/folder = parquet, *.tar file/folder of tars = webdataset, else images",
    )
    id_column: str | None = Field(
        "id", description="Parquet: None or missing column: ids are <file stem>-<row> (tars: the sample key)"
    )
    image_column: str = "image"
    caption_column: str = Field(
        "caption",
        description="Parquet column; for tars, the key in a sample's .json when it has no caption file",
    )
    grounding_column: str | None = Field(
        None,
        description="Parquet: phrase boxes of each caption, [[start, end, x0, y0, x1, y1], ...] or that as JSON "
        "(lidit.layout); any such source makes the cache store layout targets",
    )
    negative_caption_column: str | None = Field(
        None,
        description="Parquet: a hard-negative caption per row (one the image does not show; null or empty for "
        "none); any such source makes the cache store their states for `model.hard_negative_weight`",
    )
    caption_extension: str = Field(
        ".txt", description="image folders: caption file beside each image; tars: caption member of a sample"
    )

    def extra_columns(self) -> tuple[str, ...]:
        """The optional per-row Parquet columns this source reads (grounding, negative caption), in that order."""
        return tuple(c for c in (self.grounding_column, self.negative_caption_column) if c)

    def unit_settings(self) -> dict[str, Any]:
        """The settings that key this source's units (the URI is keyed with the content). A source without
        grounding or negative captions keys them as before those existed, so those caches stay valid."""
        later = {"grounding_column", "negative_caption_column"}
        skip = {"uri"} | {k for k in later if getattr(self, k) is None}
        return self.model_dump(mode="json", exclude=skip)


IMAGE_EXTENSIONS = tuple(f".{ext}" for ext in webdataset.IMAGE_EXTENSIONS)  # image-folder suffixes


@dataclass
class SourceFile:
    """One file of a source (or one image folder), with what planning needs."""

    source: SourceConfig
    format: str  # "parquet" | "webdataset" | "images"
    uri: str
    path: str  # filesystem path
    fingerprint: str
    rows: int
    # image folders: per row (image path, caption path or None, per-file fingerprint)
    files: list[tuple[str, str | None, str]] = field(default_factory=list)
    tar: webdataset.TarScan | None = None  # tars: the header scan (row ranges seek with its index)


def _detect_format(loc: Location, cfg: SourceConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    if loc.path.endswith(".parquet"):
        return "parquet"
    if not loc.fs.exists(loc.path):
        raise ConfigError(f"sources: source not found: {cfg.uri}")
    if loc.path.endswith(".tar"):
        return "webdataset"
    if loc.fs.isdir(loc.path):
        found = loc.fs.find(loc.path)
        if any(p.endswith(".parquet") for p in found):
            return "parquet"
        if any(p.endswith(".tar") for p in found):
            return "webdataset"
    return "images"


def _id_or_default(stem: str, row: int) -> str:
    return f"{stem}-{row:08d}"


def discover(
    cfg: SourceConfig, storage_options: dict[str, Any], memo: Location | None = None
) -> list[SourceFile]:
    """List a source's files in a stable order, with fingerprints and row counts (from Parquet footers, tar
    headers: no rows are read here; ids are read and deduplicated by workers, `pipelines.dedupe`). Tar sample
    counts are memoised under `memo` (the cache root) by file fingerprint, so an unchanged tar is not rescanned."""
    loc = open_location(cfg.uri, storage_options)
    fmt = _detect_format(loc, cfg)
    for option in ("grounding_column", "negative_caption_column"):
        if getattr(cfg, option) and fmt != "parquet":
            raise ConfigError(f"sources: {cfg.uri}: {option} needs a Parquet source, this one is {fmt}")
    if not loc.fs.exists(loc.path):
        raise ConfigError(f"sources: source not found: {cfg.uri}")
    if fmt == "webdataset":
        return _discover_tars(loc, cfg, memo)
    if fmt == "parquet":
        out = []
        for info in _listing(loc, cfg, ".parquet"):
            path = info["name"]
            with loc.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                for col in (cfg.image_column, cfg.caption_column) + cfg.extra_columns():
                    if col is None:
                        continue
                    if col not in names:
                        raise ConfigError(
                            f"sources: {loc.uri_of(path)}: no column {col!r} (columns: {names})"
                        )
                rows = pf.metadata.num_rows
            out.append(SourceFile(cfg, fmt, loc.uri_of(path), path, file_fingerprint(info), rows))
        return out
    # image folder: one SourceFile for the whole folder; its listing (O(files)) is the planner's, as for any
    # folder of loose files: use Parquet or WebDataset tars at scale
    if not loc.fs.isdir(loc.path):
        raise ConfigError(f"sources: image source must be a folder: {cfg.uri}")
    found = loc.fs.find(loc.path, detail=True)
    lower = {p: p.lower() for p in found}
    images = sorted(p for p in found if lower[p].endswith(IMAGE_EXTENSIONS))
    if not images:
        raise ConfigError(f"sources: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {cfg.uri}")
    files = []
    for p in images:
        cap = posixpath.splitext(p)[0] + cfg.caption_extension
        cap = cap if cap in found else None
        fp = file_fingerprint(found[p]) + ("|" + file_fingerprint(found[cap]) if cap else "")
        files.append((p, cap, fp))
    fingerprint = hash_json([(posixpath.relpath(p, loc.path), fp) for p, _, fp in files])[:32]
    return [SourceFile(cfg, fmt, loc.uri, loc.path, fingerprint, len(files), files)]


def _listing(loc: Location, cfg: SourceConfig, suffix: str) -> list[dict[str, Any]]:
    """Listing entries of the source's `suffix` files in path order (the source itself if it is a file)."""
    if loc.fs.isdir(loc.path):
        found = loc.fs.find(loc.path, detail=True)
        infos = [found[p] for p in sorted(found) if p.endswith(suffix)]
    else:
        infos = [loc.fs.info(loc.path)]
    if not infos:
        raise ConfigError(f"sources: no {suffix} files under {cfg.uri}")
    return infos


def _discover_tars(loc: Location, cfg: SourceConfig, memo: Location | None) -> list[SourceFile]:
    out = []
    for info in _listing(loc, cfg, ".tar"):
        path, fingerprint = info["name"], file_fingerprint(info)
        tar = _tar_scan(loc, path, fingerprint, int(info["size"]), memo)
        if tar.stopped_early:
            print(
                f"[cache] warning: {loc.uri_of(path)}: tar headers end at byte {tar.end} of {tar.size} (a corrupt "
                f"header or a cut inside one): members after it are not read; {tar.rows} samples before it are",
                file=sys.stderr,
                flush=True,
            )
        out.append(SourceFile(cfg, "webdataset", loc.uri_of(path), path, fingerprint, tar.rows, tar=tar))
    return out


def _tar_scan(
    loc: Location, path: str, fingerprint: str, size: int, memo: Location | None
) -> webdataset.TarScan:
    key = hash_json([loc.uri_of(path), fingerprint])[:24]
    memo_path = memo.join(C.PLAN_DIR, f"tar-{key}.json") if memo is not None else None
    if memo_path is not None and memo.exists(memo_path):
        known = json.loads(memo.read_bytes(memo_path))
        if "index" in known:  # memos from before the header index are rescanned once
            return webdataset.TarScan(**known)
    with loc.fs.open(path, "rb") as f:
        tar = webdataset.scan(f, size)
    if memo_path is not None:
        memo.write_bytes_atomic(memo_path, json.dumps(tar.to_json()).encode())
    return tar


def _image_id(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def read_ids(loc: Location, rows: RowRange) -> list[str | None]:
    """Ids of a row range (only the id column is read)."""
    if rows.format == "parquet":
        return read_parquet_rows(loc, rows.path, rows.source, rows.start, rows.stop, ids_only=True).ids
    if rows.format == "webdataset":
        with loc.fs.open(rows.path, "rb") as f:
            return [s.key for s in webdataset.samples_in_range(f, rows.start, rows.stop, rows.seek)]
    return [_image_id(img) for img, _ in rows.files]


class UnitRows(NamedTuple):
    """A unit's rows as its source holds them, read by the worker that decodes them."""

    ids: list[str | None]
    images: list[Any]
    captions: list[Any]
    flaws: dict[int, tuple[str, str]]  # row offset -> (quarantine reason, detail) the source already knows
    groundings: list[Any] | None = None  # `grounding_column` values (Parquet sources that have one)
    negative_captions: list[Any] | None = None  # `negative_caption_column` values (ditto)


def read_unit_rows(loc: Location, task: RowRange) -> UnitRows:
    """Ids, image values, captions, known flaws and groundings of a unit's rows."""
    if task.format == "parquet":
        rows = read_parquet_rows(loc, task.path, task.source, task.start, task.stop)
        return UnitRows(rows.ids, rows.images, rows.captions, {}, rows.groundings, rows.negative_captions)
    if task.format == "webdataset":
        with loc.fs.open(task.path, "rb") as f:
            samples = webdataset.read_samples(
                f,
                task.start,
                task.stop,
                task.source.caption_extension,
                task.source.caption_column,
                task.seek,
            )
        flaws = {i: s.flaw for i, s in enumerate(samples) if s.flaw is not None}
        return UnitRows(
            [s.id for s in samples], [s.image for s in samples], [s.caption for s in samples], flaws
        )
    ids, images, captions = [], [], []
    for img_path, cap_path in task.files:
        ids.append(_image_id(img_path))
        images.append(loc.read_bytes(img_path))
        captions.append(None if cap_path is None else _read_text(loc, cap_path))
    return UnitRows(ids, images, captions, {})


def _read_text(loc: Location, path: str) -> str:
    return loc.read_bytes(path).decode("utf-8", errors="replace").strip()


def read_parquet_rows(
    loc: Location, path: str, cfg: SourceConfig, start: int, stop: int, ids_only: bool = False
) -> UnitRows:
    """Ids, image values, captions, groundings and negative captions (None without their column) of rows
    [start, stop) of a Parquet file (reads only the row groups needed; `ids_only`: the ids alone).

    Ids are the `id_column` as strings, or `<file stem>-<row>` when the file has no such column.
    """
    with loc.fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        groups, offset, first = [], 0, None
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n > start and offset < stop:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return UnitRows([], [], [], {})
        has_ids = bool(cfg.id_column) and cfg.id_column in pf.schema_arrow.names
        data = [] if ids_only else [cfg.image_column, cfg.caption_column, *cfg.extra_columns()]
        columns = list(dict.fromkeys(data + ([cfg.id_column] if has_ids else [])))
        table: pa.Table | None = pf.read_row_groups(groups, columns=columns) if columns else None
    if has_ids:
        ids = [None if x is None else str(x) for x in table.column(cfg.id_column).to_pylist()]
        ids = ids[start - first : stop - first]
    else:
        stem = posixpath.splitext(posixpath.basename(path))[0]
        ids = [_id_or_default(stem, i) for i in range(start, stop)]
    if ids_only:
        return UnitRows(ids, [], [], {})
    table = table.slice(start - first, stop - start)

    def values(column: str | None) -> list[Any] | None:
        return table.column(column).to_pylist() if column else None

    return UnitRows(
        ids,
        values(cfg.image_column),
        values(cfg.caption_column),
        {},
        values(cfg.grounding_column),
        values(cfg.negative_caption_column),
    )
