from __future__ import annotations

import json

import pytest

from lidit.layout import crop_grounding, grounding_targets, parse_grounding

CAPTION = "a red square left of a blue circle"
# "a red square" (0-12) on the left half, "a blue circle" (21-34) on the right, same height
GROUNDING = [[0, 12, 0.0, 0.25, 0.5, 0.75], [21, 34, 0.5, 0.25, 1.0, 0.75]]
TOKENS = [(0, 1), (2, 5), (6, 12), (13, 17), (18, 20), (21, 22), (23, 27), (28, 34)]


def test_targets_are_offsets_from_the_midpoint_in_quarter_images() -> None:
    targets = grounding_targets(parse_grounding(GROUNDING, CAPTION), TOKENS)
    # centres x 0.25 and 0.75, midpoint 0.5: -0.25 and +0.25 image widths = -1 and +1 quarter images
    assert targets[:, 0].tolist() == [-1.0, -1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert targets[:, 1].abs().sum() == 0


def test_fewer_than_two_phrases_place_nothing() -> None:
    assert grounding_targets(parse_grounding(GROUNDING[:1], CAPTION), TOKENS).abs().sum() == 0
    assert grounding_targets(parse_grounding(None, CAPTION), TOKENS).abs().sum() == 0
    assert grounding_targets(parse_grounding("[]", CAPTION), TOKENS).shape == (len(TOKENS), 2)


def test_json_and_lists_parse_alike() -> None:
    assert parse_grounding(json.dumps(GROUNDING), CAPTION) == parse_grounding(GROUNDING, CAPTION)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "not JSON"),
        ({"start": 0}, "must be a list"),
        ([[0, 12, 0.0, 0.2, 0.5]], "expected \\[start, end"),
        ([[0, 99, 0.0, 0.2, 0.5, 0.7]], "outside the caption"),
        ([[5, 2, 0.0, 0.2, 0.5, 0.7]], "outside the caption"),
        ([[0, 12, 0.6, 0.2, 0.5, 0.7]], "not inside \\[0, 1\\]"),
        ([[0, 12, 0.0, 0.2, 1.5, 0.7]], "not inside \\[0, 1\\]"),
        ([[0, 12, "a", 0.2, 0.5, 0.7]], "non-numeric"),
        ([[0, 12, float("nan"), 0.2, 0.5, 0.7]], "non-finite"),
    ],
)
def test_bad_groundings_say_what_is_wrong(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_grounding(value, CAPTION)


def test_the_bucket_crop_moves_boxes() -> None:
    grounding = parse_grounding(GROUNDING, CAPTION)
    assert crop_grounding(grounding, 64, 64, (64, 64)) == grounding  # same size: unchanged
    # 128x64 into a 64x64 bucket: resized to 128x64 (already covers), centre crop keeps x in [32, 96)
    cropped = crop_grounding(grounding, 128, 64, (64, 64))
    assert cropped[0][2:] == pytest.approx((-0.5, 0.25, 0.5, 0.75))
    assert cropped[1][2:] == pytest.approx((0.5, 0.25, 1.5, 0.75))
    # offsets double with the crop: the phrases are now one half-crop apart on each side
    assert grounding_targets(cropped, TOKENS)[:, 0].tolist() == [-2.0, -2.0, -2.0, 0.0, 0.0, 2.0, 2.0, 2.0]
