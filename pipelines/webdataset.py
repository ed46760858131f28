"""WebDataset tar shards as a cache source (img2dataset's default output).

A sample is a run of consecutive members that share a key: `000042.jpg` + `000042.txt` (+ `000042.json`); the
key is the member path up to the first dot of its file name, and it is the row's id. Archives are read with
tarfile's header seeks (`r:` mode on a seekable file, local or s3://): counting samples reads 512 bytes per
member, and a row range reads only its own members' data.

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
from dataclasses import dataclass
from typing import Any, BinaryIO

# Image suffixes without the dot (member extensions); `pipelines.sources` derives its folder suffixes from it.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
# After the last member's block-padded data two zero blocks close a tar, and writers pad it to a record.
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


@dataclass(frozen=True)
class TarScan:
    """What planning needs of one archive: its sample count and whether its headers cover the whole file."""

    rows: int
    end: int  # byte offset after the last member read (its data padded to a block)
    size: int  # file size in bytes

    @property
    def stopped_early(self) -> bool:
        """Headers ended (truncation or a corrupt header) with more of the file left than tar's padding."""
        return self.size - self.end > _END_OF_ARCHIVE + _RECORD

    def to_json(self) -> dict[str, int]:
        return {"rows": self.rows, "end": self.end, "size": self.size}


@dataclass
class Sample:
    """One sample: its key and its members by extension (lower case, without the dot)."""

    key: str
    members: dict[str, tarfile.TarInfo]


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
            current = Sample(key, {})
        current.members.setdefault(ext, info)
    if current is not None:
        yield current


def samples_in_range(f: BinaryIO, start: int, stop: int) -> list[Sample]:
    """Samples [start, stop) of an archive; reads no header past the last of them."""
    return list(itertools.islice(iter_samples(f), start, stop))


def scan(f: BinaryIO, size: int) -> TarScan:
    """Count an archive's samples from its headers alone."""
    rows, end = 0, 0
    for sample in iter_samples(f):
        rows += 1
        end = max(end, *(m.offset_data + m.size for m in sample.members.values()))
    # Member data is padded to a block: the next header starts at the rounded-up offset.
    end = -(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return TarScan(rows=rows, end=min(end, size), size=size)


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
    f: BinaryIO, start: int, stop: int, caption_extension: str, caption_key: str
) -> list[SampleRow]:
    """Samples [start, stop) of an archive: the first image member, the caption from the `caption_extension`
    member (else `caption_key` of the `.json` member), reading only those members' data."""
    wanted = samples_in_range(f, start, stop)
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
