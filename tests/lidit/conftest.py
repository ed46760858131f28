from __future__ import annotations

import pytest
import torch

from tests.lidit.tiny_lms import build_tiny_lms


@pytest.fixture(scope="session")
def tiny_lm_paths(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_tiny_lms(tmp_path_factory.mktemp("tiny_lms"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
