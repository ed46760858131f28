"""An encoder's shared prefix states file: written by the encoder actor, read back (header only) at commit.

The file name carries the encoder's fingerprint, so rewriting it is harmless and a shard computed with that
fingerprint always has its prefix file beside it (the actor writes it before it encodes any row).
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING, Any

from lidit.cache import contract as C
from lidit.cache.storage import open_location
from lidit.fingerprint import hash_bytes

if TYPE_CHECKING:  # encoder actors import this module; keep it light
    from pipelines.models import EncoderInfo


def write_prefix(output_uri: str, storage_options: dict, prefix_file: str, encoder: Any, dtype: str) -> None:
    """Write `encoder`'s (a `PromptEncoder`) prefix states in the stored `dtype`, unless already there."""
    from safetensors.torch import save

    out = open_location(output_uri, storage_options)
    path = out.join(prefix_file)
    if out.exists(path):
        return
    prefix = encoder.prefix_states.detach().to("cpu", C.torch_dtype(dtype)).contiguous()
    out.write_bytes_atomic(path, save({C.PREFIX_TENSOR: prefix}, metadata={"encoder": encoder.name}))


def encoder_entry(output_uri: str, storage_options: dict, info: EncoderInfo) -> tuple[C.EncoderEntry, int]:
    """The manifest entry of a planned encoder, completed from its prefix file; and the file's size."""
    out = open_location(output_uri, storage_options)
    path = out.join(info.prefix_file)
    if not out.exists(path):
        raise RuntimeError(f"internal error: prefix file {info.prefix_file} missing for encoder {info.name}")
    data = out.read_bytes(path)
    (n,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header length, then a JSON header
    shape = json.loads(data[8 : 8 + n])[C.PREFIX_TENSOR]["shape"]
    entry = C.EncoderEntry(**info.model_dump(), prefix_len=int(shape[0]), prefix_sha256=hash_bytes(data))
    return entry, len(data)
