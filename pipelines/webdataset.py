"""WebDataset tar shards as a cache source (img2dataset's default output).

A sample is a run of consecutive members that share a key: `000042.jpg` + `000042.txt` (+ `000042.json`); the
key is the member path up to the first dot of its file name, and it is the row's id. Archives are read with
tarfile's header seeks (`r:` mode on a seekable file, local or s3://): counting samples reads 512 bytes per
member, and a row range reads only its own members' data. The count also records where every
`INDEX_EVERY`-th sample's headers start, so a range late in a large archive starts reading headers near its
first sample instead of at the top of the file.

A damaged archive loses nothing silently: a member whose data runs past the end of the file (a truncated
download) makes its sample a `truncated` row; where the headers stop before the file does (a cut or corrupt
header), `TarScan.stopped_early` says so and the planner warns with the byte offset.
"""

from __future__ import annotations

import itertools
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

# Image suffixes without the dot (member extensions); `pipelines.sources` derives its folder suffixes from it.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
# After the last member's block-padded data two zero blocks close a tar, and writers pad it to a record.
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
# Samples between two recorded header offsets: a range walks at most this many headers before its first
# sample; 10k-sample img2dataset shards keep a 157-entry index.
INDEX_EVERY = 64


@dataclass(frozen=True)
class TarScan:
    """What planning needs of one archive: its sample count and whether its headers cover the whole file."""

    rows: int
    end: int  # byte offset after the last member read (its data padded to a block)
    size: int  # file size in bytes
    index: list[int] = field(
        default_factory=list
    )  # header offset of samples 0, INDEX_EVERY, 2 * INDEX_EVERY...

    @property
    def stopped_early(self) -> bool:
        """Headers ended (truncation or a corrupt header) with more of the file left than tar's padding."""
        return self.size - self.end > _END_OF_ARCHIVE + _RECORD

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "end": self.end, "size": self.size, "index": self.index}

    def seek_point(self, start: int) -> tuple[int, int] | None:
        """(sample number, header offset) of the last indexed sample at or before `start`."""
        return seek_point(self.index, start)


def seek_point(index: list[int], start: int) -> tuple[int, int] | None:
    """(sample number, header offset) of the last sample of `index` (one per `INDEX_EVERY`) at or before
    `start`; None without an index."""
    if not index:
        return None
    k = min(start // INDEX_EVERY, len(index) - 1)
    return k * INDEX_EVERY, index[k]


@dataclass
class Sample:
    """One sample: its key and its members by extension (lower case, without the dot)."""

    key: str
    members: dict[str, tarfile.TarInfo]
    offset: int = 0  # header offset of its first member


def split_name(name: str) -> tuple[str, str]:
    """`dir/000042.seg.png` -> (`dir/000042`, `seg.png`): WebDataset splits at the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


def _members(f: BinaryIO) -> Iterator[tarfile.TarInfo]:
    """File members in archive order; stops (without raising) where the archive stops being readable."""
    try:
        archive = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError:
        return  # not even a first header: no samples (the planner's scan reports where it stopped)
    while True:
        try:
            info = archive.next()
        except tarfile.ReadError:  # "unexpected end of data": the last member's data runs past the file
            return
        if info is None:
            return
        if info.isfile():
            yield info
        archive.members.clear()  # keep memory flat over archives of 100k members


def iter_samples(f: BinaryIO) -> Iterator[Sample]:
    """Samples in archive order (a key that reappears later, not adjacent, starts a new sample: a duplicate)."""
    current: Sample | None = None
    for info in _members(f):
        key, ext = split_name(info.name)
        if not ext:
            continue  # no extension: not part of any sample
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = Sample(key, {}, info.offset)
        current.members.setdefault(ext, info)
    if current is not None:
        yield current


def samples_in_range(f: BinaryIO, start: int, stop: int, seek: tuple[int, int] | None = None) -> list[Sample]:
    """Samples [start, stop) of an archive; reads no header past the last of them. `seek` (sample number,
    header offset at or before `start`, from `seek_point`) starts the header walk there."""
    first, offset = seek or (0, 0)
    f.seek(offset)  # tarfile reads from the file's position, and its member offsets stay absolute
    return list(itertools.islice(iter_samples(f), start - first, stop - first))


def scan(f: BinaryIO, size: int) -> TarScan:
    """Count an archive's samples from its headers alone, recording every `INDEX_EVERY`-th one's offset."""
    rows, end, index = 0, 0, []
    for sample in iter_samples(f):
        if rows % INDEX_EVERY == 0:
            index.append(sample.offset)
        rows += 1
        end = max(end, *(m.offset_data + m.size for m in sample.members.values()))
    # Member data is padded to a block: the next header starts at the rounded-up offset.
    end = -(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return TarScan(rows=rows, end=min(end, size), size=size, index=index)


@dataclass
class SampleRow:
    """A sample's id, image bytes (None if it has no image member), caption, and what is wrong with it."""

    id: str
    image: bytes | None
    caption: str | None
    flaw: tuple[str, str] | None  # (quarantine reason, detail)


def _read(f: BinaryIO, info: tarfile.TarInfo) -> tuple[bytes, bool]:
    f.seek(info.offset_data)
    data = f.read(info.size)
    return data, len(data) < info.size


def read_samples(
    f: BinaryIO,
    start: int,
    stop: int,
    caption_extension: str,
    caption_key: str,
    seek: tuple[int, int] | None = None,
) -> list[SampleRow]:
    """Samples [start, stop) of an archive: the first image member, the caption from the `caption_extension`
    member (else `caption_key` of the `.json` member), reading only those members' data (`seek`: as for
    `samples_in_range`)."""
    wanted = samples_in_range(f, start, stop, seek)
    text_ext = caption_extension.lstrip(".").lower()
    rows = []
    for sample in wanted:
        cut: list[str] = []
        image_info = next((sample.members[e] for e in sample.members if e in IMAGE_EXTENSIONS), None)
        image = None
        if image_info is not None:
            image, short = _read(f, image_info)
            cut += [image_info.name] if short else []
        caption = None
        if text_ext in sample.members:
            data, short = _read(f, sample.members[text_ext])
            caption = data.decode("utf-8", errors="replace").strip()
            cut += [sample.members[text_ext].name] if short else []
        elif "json" in sample.members:
            data, short = _read(f, sample.members["json"])
            cut += [sample.members["json"].name] if short else []
            caption = _json_caption(data, caption_key)
        flaw = ("truncated", f"{', '.join(cut)}: data ends past the end of the archive") if cut else None
        rows.append(SampleRow(sample.key, image, caption, flaw))
    return rows


def _json_caption(data: bytes, key: str) -> str | None:
    try:
        value: Any = json.loads(data)
    except ValueError:
        return None
    caption = value.get(key) if isinstance(value, dict) else None
    return caption if isinstance(caption, str) else None
