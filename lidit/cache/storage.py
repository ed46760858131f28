"""Local-or-S3 file access for the cache: one fsspec filesystem per URI, atomic writes, fingerprints.

S3 endpoint and credentials come from `storage_options` when given, else the environment
(`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), so the same
code talks to AWS, MinIO or a test server on 127.0.0.1.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def s3_options_from_env() -> dict[str, Any]:
    """s3fs keyword arguments from the standard AWS environment variables (endpoint included)."""
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    return opts


@dataclass
class Location:
    """A directory-like URI with its filesystem: `path` is what the filesystem expects (no scheme)."""

    uri: str
    fs: fsspec.AbstractFileSystem
    path: str
    options: dict[str, Any] = field(default_factory=dict)

    def join(self, *parts: str) -> str:
        """Filesystem path of `parts` under this location."""
        return "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts]])

    def uri_of(self, path: str) -> str:
        """Full URI of a filesystem path (adds the scheme back for S3)."""
        return f"s3://{path}" if is_s3(self.uri) else path

    def child(self, *parts: str) -> Location:
        path = self.join(*parts)
        return Location(self.uri_of(path), self.fs, path, self.options)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Make `path` appear complete or not at all (temp + rename locally; a single PUT on S3)."""
        if is_s3(self.uri):
            self.fs.pipe_file(path, data)  # S3 objects become visible only when the upload completes
            return
        os.replace(_local_temp(path, data), path)

    def write_bytes_exclusive(self, path: str, data: bytes) -> None:
        """Like `write_bytes_atomic`, but only if `path` does not exist yet: `FileExistsError` otherwise, and
        of two racing writers exactly one succeeds (a conditional PUT `If-None-Match: *` on S3; a hard link,
        which fails on an existing name, locally)."""
        if is_s3(self.uri):
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                raise
            except OSError as exc:  # s3fs maps a 412 without its Condition field to a plain OSError
                if "precondition" in str(exc).lower():
                    raise FileExistsError(f"{self.uri_of(path)} already exists") from exc
                raise
            return
        tmp = _local_temp(path, data)
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)

    def pyarrow_fs(self) -> pafs.FileSystem:
        """A pyarrow filesystem for `ray.data.read_parquet` / `pyarrow.parquet` over `path`s."""
        if is_s3(self.uri):
            return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))
        return pafs.LocalFileSystem()


def _local_temp(path: str, data: bytes) -> str:
    """`data` durably in a temp file beside `path` (same filesystem, so a rename or link of it is atomic)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def open_location(uri: str, storage_options: dict[str, Any] | None = None) -> Location:
    """Resolve a local path or `s3://bucket/prefix` to a `Location` (local paths become absolute)."""
    if not uri:
        raise ValueError("empty location URI")
    if is_s3(uri):
        opts = {**s3_options_from_env(), **(storage_options or {})}
        fs = fsspec.filesystem("s3", **opts)
        path = uri.split("://", 1)[1].rstrip("/")
        if not path:
            raise ValueError(f"S3 URI needs a bucket: {uri!r}")
        return Location(f"s3://{path}", fs, path, opts)
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {uri!r} (use a local path or s3://)")
    path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    return Location(path, fsspec.filesystem("file"), path, {})


def file_fingerprint(info: dict[str, Any]) -> str:
    """Cheap content fingerprint from a listing entry: size + ETag on S3, size + mtime locally."""
    size = info.get("size")
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{size}:{tag}"
