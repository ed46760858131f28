from __future__ import annotations

import numpy as np

from lidit.starter.render import from_png, render, to_png
from lidit.starter.scenes import (
    BACKGROUND,
    COLOURS,
    COUNTS,
    RELATIONS,
    SHAPES,
    box_center,
    combo_keys,
    heldout_combos,
    relation_holds,
    sample_scene,
    sample_scenes,
)

HELD = heldout_combos(0, 0.1)
TRAIN = [spec for _, spec in sample_scenes(0, "train", 1500, HELD)]
HELDOUT = [spec for _, spec in sample_scenes(0, "heldout", 300, HELD)]


def test_sampling_is_deterministic_and_indexed() -> None:
    assert sample_scene(0, "train", 7, HELD) == TRAIN[7]
    assert sample_scene(1, "train", 7, heldout_combos(1, 0.1)) != TRAIN[7]
    ids = [sid for sid, _ in sample_scenes(0, "heldout", 3, HELD)]
    assert ids == ["heldout-000000", "heldout-000001", "heldout-000002"]
    assert heldout_combos(0, 0.1) == HELD and len(HELD) >= 10


def test_heldout_combinations_never_in_train_but_their_parts_are() -> None:
    assert not any(combo_keys(s) & HELD for s in TRAIN)
    assert all(combo_keys(s) & HELD for s in HELDOUT)
    seen = {(o["colour"], o["shape"]) for s in TRAIN for o in s["objects"]}
    assert seen == {(c, s) for c in COLOURS for s in SHAPES}
    train_rels = {s["relation"]["relation"] for s in TRAIN if s["relation"]}
    train_counts = {o["count"] for s in TRAIN for o in s["objects"]}
    assert train_rels == set(RELATIONS) and set(COUNTS) <= train_counts
    # Each held-out key's colour-shape pair is seen in train in some other context.
    for colour, shape, ctx in HELD:
        assert any((colour, shape) == (k[0], k[1]) and k[2] != ctx for s in TRAIN for k in combo_keys(s)), (
            colour,
            shape,
            ctx,
        )


def test_kind_weights_set_the_training_mix() -> None:
    from collections import Counter

    mixed = Counter(
        s["kind"]
        for _, s in sample_scenes(
            0, "train", 2000, HELD, 64, {"single": 0, "count": 1, "pair": 0, "relation": 3}
        )
    )
    assert set(mixed) == {"count", "relation"}
    assert 0.70 < mixed["relation"] / 2000 < 0.80  # 3:1 relation:count, binomial sd about 0.01
    default = Counter(s["kind"] for s in TRAIN)
    assert set(default) == {"single", "count", "pair", "relation"}


def test_layout_is_valid_and_relations_hold() -> None:
    for spec in TRAIN + HELDOUT:
        boxes = [b for o in spec["objects"] for b in o["boxes"]]
        assert sum(o["count"] for o in spec["objects"]) == len(boxes)
        for b in boxes:
            assert 0 <= b[0] < b[2] <= 64 and 0 <= b[1] < b[3] <= 64
        for i, a in enumerate(boxes):  # no two objects touch
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        rel = spec["relation"]
        if rel:
            a = box_center(spec["objects"][rel["subject"]]["boxes"][0])
            b = box_center(spec["objects"][rel["object"]]["boxes"][0])
            assert relation_holds(a, b, rel["relation"], margin=8)
            assert spec["objects"][0]["colour"] != spec["objects"][1]["colour"]


def test_grid_puts_every_box_corner_on_the_grid_and_leaves_the_default_scenes_alone() -> None:
    gridded = [s for _, s in sample_scenes(0, "train", 400, HELD, 64, None, 8)]
    gridded += [s for _, s in sample_scenes(0, "heldout", 100, HELD, 64, None, 8)]
    corners = {c for s in gridded for o in s["objects"] for b in o["boxes"] for c in b[:2]}
    assert corners <= set(range(0, 64, 8)) and {0, 8, 40} <= corners  # the border row/column is used too
    for spec in gridded:
        boxes = [b for o in spec["objects"] for b in o["boxes"]]
        assert all(b[2] <= 64 and b[3] <= 64 for b in boxes)
        for i, a in enumerate(boxes):  # the usual gap still holds
            for b in boxes[i + 1 :]:
                assert a[2] + 4 <= b[0] or b[2] + 4 <= a[0] or a[3] + 4 <= b[1] or b[3] + 4 <= a[1]
    assert not any(combo_keys(s) & HELD for s in gridded[:400])
    # grid 0 (the default) draws exactly the scenes it always drew
    assert [s for _, s in sample_scenes(0, "train", 50, HELD, 64, None, 0)] == TRAIN[:50]
    assert any(b[0] % 8 for s in TRAIN for o in s["objects"] for b in o["boxes"])


def test_relation_holds_geometry() -> None:
    assert relation_holds((10, 30), (40, 32), "left_of", 2)
    assert relation_holds((40, 32), (10, 30), "right_of", 2)
    assert relation_holds((30, 5), (31, 50), "above", 2)
    assert not relation_holds((10, 10), (14, 50), "left_of", 2)  # mostly below, not left


def test_render_draws_exact_colours_on_plain_background() -> None:
    spec = TRAIN[0]
    img = render(spec)
    assert img.size == (64, 64) and img.mode == "RGB"
    arr = np.asarray(img)
    assert tuple(arr[0, 0]) == BACKGROUND
    o = spec["objects"][0]
    x0, y0, x1, y1 = o["boxes"][0]
    assert tuple(arr[(y0 + y1) // 2, (x0 + x1) // 2]) == COLOURS[o["colour"]]
    assert np.array_equal(np.asarray(from_png(to_png(img))), arr)
    assert to_png(img) == to_png(render(spec))
