from __future__ import annotations

from collections import Counter

import pytest

from lidit.starter.captions import (
    OPPOSITE_RELATION_WORDS,
    binding_negative,
    caption_for,
    known_vocabulary,
    locate_mentions,
    position_bin,
    prompt_words,
    relation_negative,
    relative_position,
    shape_negative,
    swap_attribute_words,
    swap_relation_words,
)
from lidit.starter.scenes import INVERSE, combo_keys, heldout_combos, sample_scenes

HELD = heldout_combos(0, 0.1)
SAMPLES = list(sample_scenes(0, "train", 1500, HELD))


def test_caption_is_deterministic_per_id() -> None:
    sid, spec = SAMPLES[3]
    assert caption_for(spec, 0, sid) == caption_for(spec, 0, sid)
    texts = {caption_for(spec, 0, f"x-{i}").text for i in range(30)}
    assert len(texts) > 10  # varied phrasing for the same scene


def test_mentions_are_where_the_objects_are_named() -> None:
    vocab = known_vocabulary()
    for sid, spec in SAMPLES:
        cap = caption_for(spec, 0, sid)
        words = cap.text.split()
        assert set(words) <= vocab, cap.text
        assert len(cap.mentions) == len(spec["objects"])
        for m, obj in zip(cap.mentions, spec["objects"], strict=True):
            phrase = words[m.word_start : m.word_end + 1]
            assert phrase[-2] == obj["colour"] and phrase[-1].startswith(obj["shape"])
            assert m.rel_pos == relative_position(m.word_start, m.word_end, len(words))
        # The evaluator finds the same mentions from the text alone.
        assert locate_mentions(cap.text, spec) == cap.mentions


def test_word_order_varies_so_every_object_lands_in_every_third() -> None:
    bins: Counter[tuple[str, str]] = Counter()
    subject_first = Counter()
    for sid, spec in SAMPLES:
        cap = caption_for(spec, 0, sid)
        for m in cap.mentions:
            bins[(spec["kind"], position_bin(m.rel_pos))] += 1
        if spec["relation"]:
            subject_first[cap.mentions[0].word_start < cap.mentions[1].word_start] += 1
    for kind in ("single", "count", "pair", "relation"):
        for b in ("first", "middle", "last"):
            assert bins[(kind, b)] >= 20, (kind, b, bins)
    assert min(subject_first.values()) > 0.3 * sum(subject_first.values())


def test_locate_mentions_on_free_text() -> None:
    spec = {
        "objects": [
            {"colour": "red", "shape": "circle", "count": 2},
            {"colour": "blue", "shape": "square", "count": 1},
        ]
    }
    found = locate_mentions("Two big RED circles, and then a blue square!", spec)
    assert [(m.word_start, m.word_end) for m in found] == [(0, 3), (6, 8)]
    assert found[0].rel_pos == 0.0 and found[1].rel_pos == 1.0
    assert locate_mentions("a green triangle", spec) == [None, None]
    assert prompt_words("A red-circle") == ["a", "red", "circle"]
    assert relative_position(0, 2, 3) == 0.5


def test_swapping_relation_words_says_the_relation_the_other_way_round() -> None:
    for sid, spec in SAMPLES:
        text = caption_for(spec, 0, sid).text
        swapped = swap_relation_words(text)
        pairs = [(a, b) for a, b in zip(text.split(), swapped.split(), strict=True) if a != b]
        if spec["relation"] is None:
            assert swapped == text  # only relations have relation words
            continue
        assert len(pairs) == 1 and OPPOSITE_RELATION_WORDS[pairs[0][0]] == pairs[0][1]
    assert swap_relation_words("a red circle to the left of a blue square") == (
        "a red circle to the right of a blue square"
    )


def test_relation_negative_never_names_a_held_out_key() -> None:
    found = 0
    for sid, spec in SAMPLES:
        text = caption_for(spec, 0, sid).text
        negative = relation_negative(text, spec, HELD)
        rel = spec["relation"]
        if rel is None:
            assert negative is None
            continue
        inverted = {**spec, "relation": {**rel, "relation": INVERSE[rel["relation"]]}}
        assert (negative is None) == bool(combo_keys(inverted) & HELD)
        found += negative is not None
    assert found > 100
    spec = {
        "kind": "relation",
        "objects": [
            {"colour": "red", "shape": "circle", "count": 1},
            {"colour": "blue", "shape": "square", "count": 1},
        ],
        "relation": {"subject": 0, "relation": "left_of", "object": 1},
    }
    text = "a red circle left of a blue square"
    assert relation_negative(text, spec, set()) == "a red circle right of a blue square"
    assert relation_negative(text, spec, {("blue", "square", "left_of")}) is None  # the swap's inverse key


def test_attribute_swaps_change_only_those_words() -> None:
    caption = "two red circles to the left of a big blue square"
    shapes = swap_attribute_words(caption, "shape")
    words, swapped = caption.split(), shapes.split()
    assert [i for i, (a, b) in enumerate(zip(words, swapped, strict=True)) if a != b] == [2, 10]
    assert swapped[2] in {"squares", "triangles", "diamonds"}  # the plural stays plural
    assert swapped[10] in {"circle", "triangle", "diamond"}
    colours = swap_attribute_words(caption, "colour").split()
    assert [i for i, (a, b) in enumerate(zip(words, colours, strict=True)) if a != b] == [1, 9]
    assert colours[1] != "red" and colours[9] != "blue"
    assert swap_attribute_words(caption, "shape") == shapes  # a fixed draw per caption
    assert swap_attribute_words("a dark canvas", "colour") == "a dark canvas"
    with pytest.raises(ValueError, match="attribute"):
        swap_attribute_words(caption, "size")


def test_shape_negative_swaps_every_shape_and_never_names_a_held_out_key() -> None:
    singular = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond"}
    found = 0
    for sid, spec in SAMPLES:
        cap = caption_for(spec, 0, sid)
        negative = shape_negative(cap.text, spec, HELD)
        if negative is None:
            continue
        found += 1
        words = negative.split()
        objects = []
        for m, obj in zip(cap.mentions, spec["objects"], strict=True):
            shape = singular.get(words[m.word_end], words[m.word_end])
            assert shape != obj["shape"], (cap.text, negative)
            objects.append({**obj, "shape": shape})
        assert not combo_keys({**spec, "objects": objects}) & HELD
    assert found > 1000  # most rows have one (only held-out-naming swaps are dropped)
    spec = {
        "kind": "count",
        "objects": [{"colour": "red", "shape": "circle", "count": 3}],
        "relation": None,
    }
    negative = shape_negative("three red circles", spec, set())
    assert negative is not None and negative.startswith("three red ") and negative != "three red circles"
    swapped = negative.split()[-1].rstrip("s")
    assert shape_negative("three red circles", spec, {("red", swapped, "x3")}) is None


def test_binding_negative_passes_the_colours_round_and_never_names_a_held_out_key() -> None:
    passed = 0
    for sid, spec in SAMPLES:
        cap = caption_for(spec, 0, sid)
        negative = binding_negative(cap.text, spec, HELD)
        colours = [obj["colour"] for obj in spec["objects"]]
        if len(set(colours)) < 2:  # one colour: nothing to pass round, the shape swap instead
            assert negative == shape_negative(cap.text, spec, HELD)
            continue
        if negative is None:
            continue
        passed += 1
        words, original = negative.split(), cap.text.split()
        assert sorted(words) == sorted(original) and words != original  # the same words, other pairs
        objects = []
        for m, obj in zip(cap.mentions, spec["objects"], strict=True):
            colour = words[m.word_end - 1]
            assert colour != obj["colour"] and words[m.word_end] == original[m.word_end], (cap.text, negative)
            objects.append({**obj, "colour": colour})
        assert not combo_keys({**spec, "objects": objects}) & HELD
    assert passed > 500  # pair and relation scenes with two colours, but for held-out-naming swaps
    spec = {
        "kind": "relation",
        "objects": [
            {"colour": "red", "shape": "square", "count": 1},
            {"colour": "blue", "shape": "circle", "count": 1},
        ],
        "relation": {"subject": 0, "object": 1, "relation": "left_of"},
    }
    text = "a red square left of a big blue circle"
    assert binding_negative(text, spec, set()) == "a blue square left of a big red circle"
    assert binding_negative(text, spec, {("red", "circle", "right_of")}) is None
