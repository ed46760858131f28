"""The cache contract without Ray: exact half-precision storage, manifest round trip, no Ray import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from lidit.cache import contract as C


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_tensor_bytes_round_trip_exact(dtype):
    x = (torch.randn(7, 5) * 30).to(C.torch_dtype(dtype))
    data = C.encode_tensor(x, dtype)
    assert len(data) == x.numel() * x.element_size()  # no padding, no header
    assert torch.equal(C.decode_tensor(data, dtype, (7, 5)), x)


def test_float16_decodes_with_plain_numpy():
    x = torch.randn(3, 4).half()
    assert np.array_equal(np.frombuffer(C.encode_tensor(x, "float16"), np.float16).reshape(3, 4), x.numpy())


def test_float16_overflow_is_an_error():
    with pytest.raises(OverflowError, match="bfloat16"):
        C.encode_tensor(torch.tensor([1e6]), "float16")


def test_decode_checks_size():
    with pytest.raises(ValueError, match="expected"):
        C.decode_tensor(b"\x00" * 6, "float16", (2, 2))


def test_schema_columns_per_encoder():
    names = C.shard_schema(["a", "b"]).names
    assert names[-4:] == ["states_a", "length_a", "states_b", "length_b"]
    assert C.COL_LATENT in names and C.COL_ID == names[0]


def test_lidit_cache_never_imports_ray():
    code = "import sys, lidit.cache, lidit.cache.reader, lidit.cache.storage; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
