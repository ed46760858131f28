"""Portable model locations: which root wins, and what resolves to what."""

from __future__ import annotations

from pathlib import Path

import pytest

from lidit.locations import ModelLocationError, models_root, portable_location, resolve_location


def test_models_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIDIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LIDIT_MODELS_ROOT", raising=False)
    assert models_root() == tmp_path / "home"
    monkeypatch.setenv("LIDIT_MODELS_ROOT", str(tmp_path / "env"))
    assert models_root() == tmp_path / "env"
    assert models_root(tmp_path / "configured") == tmp_path / "configured"


def test_locations_round_trip_and_refuse_escapes(tmp_path: Path) -> None:
    (tmp_path / "root" / "starter" / "vae").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    root = tmp_path / "root"
    assert portable_location(root / "starter" / "vae", root) == "lidit-models://starter/vae"
    assert portable_location(tmp_path / "outside", root) == str(tmp_path / "outside")  # kept absolute
    assert resolve_location("lidit-models://starter/vae", root, "VAE") == str(root / "starter" / "vae")
    assert resolve_location(str(tmp_path / "outside"), root, "VAE") == str(tmp_path / "outside")
    for bad in ("lidit-models://../outside", "lidit-models://", "lidit-models:///etc"):
        with pytest.raises(ModelLocationError, match="under the models root"):
            resolve_location(bad, root, "VAE")
    with pytest.raises(ModelLocationError, match="not found"):
        resolve_location(str(tmp_path / "gone"), root, "VAE")
