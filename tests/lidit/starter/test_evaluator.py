from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image, ImageFilter

from lidit.starter.captions import caption_for
from lidit.starter.evaluator import (
    aggregate,
    control_reports,
    detect_objects,
    read_image_folder,
    score_folder,
    score_image,
    score_images,
    write_image_folder,
)
from lidit.starter.render import render
from lidit.starter.scenes import INVERSE, heldout_combos, sample_scenes

HELD = heldout_combos(0, 0.1)


@pytest.fixture(scope="module")
def items() -> list[tuple[Image.Image, dict, str]]:
    rows = list(sample_scenes(0, "train", 250, HELD)) + list(sample_scenes(0, "heldout", 150, HELD))
    return [(render(spec), spec, caption_for(spec, 0, sid).text) for sid, spec in rows]


def test_real_images_score_at_least_097(items) -> None:
    report = score_images(items)
    assert report.overall >= 0.97
    assert all(v["acc"] >= 0.97 for v in report.categories.values()), report.categories
    assert set(report.categories) == {"colour", "shape", "binding", "count", "position"}
    assert all(report.by_position[b]["n"] > 50 for b in ("first", "middle", "last"))


def test_wrong_pairs_score_near_chance(items) -> None:
    controls = control_reports(items, seed=0)
    shuffled, recoloured, blank = controls["shuffled_prompts"], controls["recoloured"], controls["blank"]
    # Another image's prompt: an image passes only when it happens to show what the other prompt asks.
    assert shuffled.overall <= 0.08
    assert shuffled.categories["colour"]["acc"] <= 0.35 and shuffled.categories["shape"]["acc"] <= 0.45
    assert shuffled.categories["position"]["acc"] <= 0.1
    # Recoloured: shapes and layout stay right (shape ~1.0 is the honest answer), colours are all wrong.
    assert recoloured.overall <= 0.03
    assert recoloured.categories["colour"]["acc"] <= 0.15 and recoloured.categories["binding"]["acc"] <= 0.05
    assert recoloured.categories["shape"]["acc"] >= 0.97
    # Blank: nothing to find.
    assert blank.overall == 0.0 and all(v["acc"] == 0.0 for v in blank.categories.values())


def test_each_check_catches_its_own_mistake(items) -> None:
    rel_item = next(
        i
        for i in items
        if i[1]["kind"] == "relation" and i[1]["objects"][0]["shape"] != i[1]["objects"][1]["shape"]
    )
    image, spec, prompt = rel_item
    assert score_image(image, spec, prompt).overall
    flipped = copy.deepcopy(spec)
    flipped["relation"]["relation"] = INVERSE[spec["relation"]["relation"]]
    s = score_image(image, flipped)
    assert not s.categories["position"] and s.categories["binding"] and not s.overall
    swapped = copy.deepcopy(spec)  # colours swapped between the two objects: colours present, binding wrong
    a, b = swapped["objects"]
    a["colour"], b["colour"] = b["colour"], a["colour"]
    s = score_image(image, swapped)
    assert s.categories["colour"] and s.categories["shape"] and not s.categories["binding"]
    count_item = next(i for i in items if i[1]["kind"] == "count")
    more = copy.deepcopy(count_item[1])
    more["objects"][0]["count"] += 1
    s = score_image(count_item[0], more)
    assert s.categories["binding"] and not s.categories["count"]


def test_tolerates_blur_and_noise(items) -> None:
    rng = np.random.default_rng(0)

    def degrade(img: Image.Image) -> Image.Image:
        arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.6))).astype(np.float32)
        arr += rng.normal(0, 8, arr.shape)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    report = score_images((degrade(img), spec, prompt) for img, spec, prompt in items[:150])
    assert report.overall >= 0.9


def test_detections_and_float_arrays(items) -> None:
    image, spec, _ = items[0]
    dets = detect_objects(image)
    assert len(dets) == sum(o["count"] for o in spec["objects"])
    assert dets == detect_objects(np.asarray(image).astype(np.float32) / 255.0)
    assert detect_objects(Image.new("RGB", (64, 64), (128, 128, 128))) == []  # grey is not a palette colour


def test_folder_round_trip(items, tmp_path) -> None:
    chosen = items[:12]
    write_image_folder(tmp_path, [(img, prompt, spec) for img, spec, prompt in chosen])
    assert len(read_image_folder(tmp_path)) == 12
    assert score_folder(tmp_path) == aggregate(score_image(*i) for i in chosen)
    with pytest.raises(FileNotFoundError, match="specs.jsonl"):
        score_folder(tmp_path / "nowhere")
