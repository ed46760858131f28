from __future__ import annotations

import re

import pytest

from lidit.layout import grounding_targets
from lidit.starter.layout import relation_grounding


def _word_spans(caption: str) -> list[tuple[int, int]]:
    """One token per word (the layout targets only need character spans)."""
    return [m.span() for m in re.finditer(r"\S+", caption)]


def _relation_spec(relation: str = "left_of") -> dict:
    return {
        "kind": "relation",
        "image_size": 64,
        "objects": [
            {"colour": "red", "shape": "square", "size": "large", "count": 1, "boxes": [[4, 20, 28, 44]]},
            {"colour": "cyan", "shape": "circle", "size": "small", "count": 1, "boxes": [[40, 24, 56, 40]]},
        ],
        "relation": {"subject": 0, "relation": relation, "object": 1},
    }


@pytest.mark.parametrize(
    "caption",
    [
        "a red square to the left of a small cyan circle",
        "to the right of a red square there is a small cyan circle",  # the same scene said the other way round
        "a small cyan circle with a red square on its left",
    ],
)
def test_each_object_s_words_get_its_side(caption: str) -> None:
    grounding = relation_grounding(caption, _relation_spec())
    assert sorted(caption[a:b] for a, b, *_ in grounding) == sorted(
        [re.search(r"an? red square", caption)[0], re.search(r"an? small cyan circle", caption)[0]]
    )
    targets = grounding_targets(grounding, _word_spans(caption))
    words = caption.split()
    assert targets.shape == (len(words), 2)
    # red square centre x 16, cyan circle 48, midpoint 32: -16 and +16 px, i.e. -1 and +1 quarter images.
    side = {w: targets[k, 0].item() for k, w in enumerate(words)}
    assert side["red"] == side["square"] == pytest.approx(-1.0)
    assert side["cyan"] == side["circle"] == side["small"] == pytest.approx(1.0)
    assert targets[:, 1].abs().max().item() == pytest.approx(0.0)  # same height
    assert all(side[w] == 0.0 for w in ("left", "right", "of", "with", "there") if w in side)  # no place


def test_captions_without_a_relation_have_no_grounding() -> None:
    spec = {**_relation_spec(), "kind": "pair", "relation": None}
    assert relation_grounding("a red square and a small cyan circle", spec) == []
