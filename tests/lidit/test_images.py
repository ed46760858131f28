from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lidit.images import make_grid


def _tiles(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (64, 64), (40 * i % 256, 0, 200)) for i in range(n)]


def test_grid_without_labels_keeps_its_layout() -> None:
    grid = make_grid(_tiles(5), cols=4)
    assert grid.size == (4 * 66 + 2, 2 * 66 + 2)
    assert grid.getpixel((2, 2)) == (0, 0, 200) and grid.getpixel((0, 0)) == (255, 255, 255)


def test_labels_go_under_their_tiles() -> None:
    tiles = _tiles(3)
    labels = ["a red circle left of a big blue square", "x", "a supercalifragilisticexpialidocious triangle"]
    grid = make_grid(tiles, cols=3, labels=labels)
    w, h = grid.size
    assert w == 3 * 66 + 2 and h > 66 + 2 + 20  # several lines under each tile
    arr = np.asarray(grid)
    for c in range(3):  # tiles intact, each label area has ink
        x = 2 + c * 66
        assert (arr[2 : 2 + 64, x : x + 64] == np.asarray(tiles[c])).all()
        assert (arr[2 + 64 + 2 : h - 2, x : x + 64] < 128).any()
    # Wrapped to the tile's width: no ink in the 2 px gaps between columns.
    assert (arr[66:, 66:68] == 255).all() and (arr[66:, 132:134] == 255).all()
    short = make_grid(tiles, cols=3, labels=labels, max_label_lines=1)
    assert short.size[1] < h
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        make_grid(tiles, labels=labels[:2])
