"""Captions for scene specs: a small grammar with varied phrasing and word order.

The grammar moves each object around the prompt (prefixes, suffixes, inverted relations, "to the left of X is Y"
clauses, "X with Y to its left"), so the benchmark can report accuracy by where an object is mentioned - the
positional-bias view of the LI-DiT paper. Object phrases are always `[determiner/number] [size] colour shape`,
which is what `locate_mentions` relies on to find them again in any prompt.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any

from lidit.starter.scenes import COLOURS, INVERSE, SHAPES, ComboKey, combo_keys

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
PLURALS = {s: s + "s" for s in SHAPES}
SHAPE_OF_WORD = {s: s for s in SHAPES} | {p: s for s, p in PLURALS.items()}  # "circles" -> "circle"
REL_PHRASES = {
    "left_of": ("to the left of", "left of", "on the left of"),
    "right_of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# "<other> with <subject> to its left": the subject is left of the other object.
REL_PRONOUN = {
    "left_of": ("to its left", "on its left"),
    "right_of": ("to its right", "on its right"),
    "above": ("above it", "over it"),
    "below": ("below it", "under it", "beneath it"),
}
PREFIXES = ("", "", "an image of", "a picture of", "a drawing of", "a simple render of", "this picture shows")
SUFFIXES = ("", "", "on a black background", "in the image", "on a dark canvas", "drawn on black")
CLAUSE_PREFIXES = ("", "", "in this image", "in the picture", "here")
_DETERMINERS = {"a", "an", "one", "single", "the"} | set(NUMBER_WORDS.values())
_SIZE_VOCAB = {w for words in SIZE_WORDS.values() for w in words}
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Mention:
    """Where one object group of a spec is mentioned in a caption (word indices, end inclusive)."""

    object_index: int
    word_start: int
    word_end: int
    rel_pos: float  # words before / (words before + words after): 0 = at the start, 1 = at the end

    def to_dict(self) -> dict[str, Any]:
        return {
            "object_index": self.object_index,
            "word_start": self.word_start,
            "word_end": self.word_end,
            "rel_pos": self.rel_pos,
        }


@dataclass(frozen=True)
class Caption:
    """A caption and, for each object group of its spec, where that group is mentioned."""

    text: str
    mentions: list[Mention]


def relative_position(word_start: int, word_end: int, n_words: int) -> float:
    """Relative position of a mention: words before it / (words before + words after), 0.5 if it is alone."""
    before, after = word_start, n_words - word_end - 1
    return 0.5 if before + after == 0 else before / (before + after)


def position_bin(rel_pos: float) -> str:
    """`first` / `middle` / `last` third of the prompt."""
    return "first" if rel_pos < 1 / 3 else ("middle" if rel_pos < 2 / 3 else "last")


def object_phrase(obj: dict[str, Any], rng: random.Random, size_prob: float = 0.5) -> list[str]:
    """Words naming one object group, e.g. `["three", "small", "red", "circles"]`."""
    count = int(obj["count"])
    if count == 1:
        words = rng.choices([["a"], ["one"], ["a", "single"]], weights=[0.75, 0.15, 0.1])[0][:]
    else:
        words = [NUMBER_WORDS[count]]
    if rng.random() < size_prob:
        words.append(rng.choice(SIZE_WORDS[obj["size"]]))
    words.append(obj["colour"])
    words.append(obj["shape"] if count == 1 else PLURALS[obj["shape"]])
    return words


def _assemble(pieces: list[str | tuple[int, list[str]]]) -> Caption:
    words: list[str] = []
    spans: dict[int, tuple[int, int]] = {}
    for piece in pieces:
        if isinstance(piece, tuple):
            idx, phrase = piece
            spans[idx] = (len(words), len(words) + len(phrase) - 1)
            words.extend(phrase)
        else:
            words.extend(piece.split())
    n = len(words)
    mentions = [Mention(i, s, e, relative_position(s, e, n)) for i, (s, e) in sorted(spans.items())]
    return Caption(" ".join(words), mentions)


def make_caption(spec: dict[str, Any], rng: random.Random) -> Caption:
    """Sample a caption for `spec` from the grammar."""
    objs = spec["objects"]
    phrases = [object_phrase(o, rng) for o in objs]
    suf = rng.choice(SUFFIXES)

    def pre(first: int) -> str:  # "there is/are" agrees with the object named first
        return rng.choice(PREFIXES + ("there " + ("are" if objs[first]["count"] > 1 else "is"),))

    rel = spec.get("relation")
    if rel is None and len(objs) == 1:
        return _assemble([pre(0), (0, phrases[0]), suf])
    if rel is None:
        a, b = (0, 1) if rng.random() < 0.5 else (1, 0)
        joiner = rng.choice(("and", "and", "together with", "as well as", "next to"))
        return _assemble([pre(a), (a, phrases[a]), joiner, (b, phrases[b]), suf])
    s, o, r = rel["subject"], rel["object"], rel["relation"]
    if rng.random() < 0.5:  # say it the other way round: "B right of A" for "A left of B"
        s, o, r = o, s, INVERSE[r]
    subj, other = (s, phrases[s]), (o, phrases[o])
    form = rng.randrange(5)
    if form == 0:  # a red circle to the left of a blue square
        return _assemble([pre(s), subj, rng.choice(REL_PHRASES[r]), other, suf])
    s_be = "are" if objs[s]["count"] > 1 else "is"
    if form == 1:  # in this image a red circle is to the left of a blue square
        return _assemble([rng.choice(CLAUSE_PREFIXES), subj, s_be, rng.choice(REL_PHRASES[r]), other, suf])
    if form == 2:  # to the left of a blue square there is a red circle
        return _assemble([rng.choice(REL_PHRASES[r]), other, rng.choice((s_be, f"there {s_be}")), subj, suf])
    if form == 3:  # a blue square with a red circle to its left
        return _assemble([pre(o), other, "with", subj, rng.choice(REL_PRONOUN[r]), suf])
    # a blue square and a red circle above it
    return _assemble([pre(o), other, "and", subj, rng.choice(REL_PRONOUN[r])])


# Every relation word of the grammar and its opposite: swapping them in a caption says its relation the other
# way round in the same words ("a red circle left of a blue square" -> "... right of ...").
OPPOSITE_RELATION_WORDS: dict[str, str] = {
    "left": "right",
    "right": "left",
    "above": "below",
    "below": "above",
    "over": "under",
    "under": "over",
    "beneath": "above",
}


def swap_relation_words(caption: str) -> str:
    """The caption with every relation word replaced by its opposite (other words, spacing kept)."""
    return re.sub(
        r"\b(" + "|".join(OPPOSITE_RELATION_WORDS) + r")\b",
        lambda m: OPPOSITE_RELATION_WORDS[m.group(1)],
        caption,
    )


def swap_attribute_words(caption: str, attribute: str, seed: int = 0) -> str:
    """The caption with every shape word (`attribute` "shape", plurals too) or colour word ("colour") replaced
    by another shape or colour, a fixed draw per (seed, caption): the same scene said with other shapes or
    colours. A model that reads those words denoises the image worse under the swapped caption."""
    words = {"shape": SHAPES, "colour": tuple(COLOURS)}.get(attribute)
    if words is None:
        raise ValueError(f"attribute must be 'shape' or 'colour', got {attribute!r}")
    rng = random.Random(f"{attribute}:{seed}:{caption}")

    def other(match: re.Match[str]) -> str:
        return rng.choice([w for w in words if w != match.group(1)]) + match.group(2)

    return re.sub(r"\b(" + "|".join(words) + r")(s?)\b", other, caption)


def relation_negative(caption: str, spec: dict[str, Any], heldout: set[ComboKey]) -> str | None:
    """A hard negative caption for a training image: its caption with the relation said the other way round.

    Only relation scenes have one, and only where the swapped caption names no held-out key: otherwise the
    negative would put a held-out combination's words into training.
    """
    rel = spec.get("relation")
    if not rel:
        return None
    swapped = {**spec, "relation": {**rel, "relation": INVERSE[rel["relation"]]}}
    if combo_keys(swapped) & heldout:
        return None
    return swap_relation_words(caption)


def shape_negative(caption: str, spec: dict[str, Any], heldout: set[ComboKey], seed: int = 0) -> str | None:
    """A hard negative caption for a training image: its caption with every shape word swapped for another
    (`swap_attribute_words`, the draw the shape preference uses).

    None where an object group is not found in the caption (so the swapped spec is unknown) or where the
    swapped caption names a held-out key: the negative must not put a held-out combination's words into
    training.
    """
    mentions = locate_mentions(caption, spec)
    if any(m is None for m in mentions):
        return None
    swapped = swap_attribute_words(caption, "shape", seed)
    words = prompt_words(swapped)
    # A swap replaces one word with one word, so the mentions' word indices still hold.
    objects = [
        {**obj, "shape": SHAPE_OF_WORD[words[m.word_end]]}
        for obj, m in zip(spec["objects"], mentions, strict=True)
    ]
    if combo_keys({**spec, "objects": objects}) & heldout:
        return None
    return swapped


def binding_negative(caption: str, spec: dict[str, Any], heldout: set[ComboKey], seed: int = 0) -> str | None:
    """A hard negative caption for a training image that tests binding: where the scene's object groups have
    two or more colours, the colours passed round between them ("a red square and a blue circle" -> "a blue
    square and a red circle": the same words, other pairs); in a one-colour scene, `shape_negative`.

    None where a group is not found in the caption or the negative would name a held-out key.
    """
    mentions = locate_mentions(caption, spec)
    if any(m is None for m in mentions):
        return None
    colours = [obj["colour"] for obj in spec["objects"]]
    if len(set(colours)) != len(colours) or len(colours) < 2:
        return shape_negative(caption, spec, heldout, seed)
    passed = colours[1:] + colours[:1]  # every group takes the next group's colour: none keeps its own
    objects = [{**obj, "colour": c} for obj, c in zip(spec["objects"], passed, strict=True)]
    if combo_keys({**spec, "objects": objects}) & heldout:
        return None
    spans = prompt_word_spans(caption)
    out = caption
    # Right to left, so earlier spans stay valid; the colour word is the one before each mention's shape word.
    for m, colour in sorted(zip(mentions, passed, strict=True), key=lambda mc: -mc[0].word_end):
        start, end = spans[m.word_end - 1]
        out = out[:start] + colour + out[end:]
    return out


def caption_for(spec: dict[str, Any], seed: int, sample_id: str) -> Caption:
    """The caption of sample `sample_id`: a pure function of seed, id and spec."""
    digest = hashlib.sha256(f"caption:{seed}:{sample_id}".encode()).hexdigest()
    return make_caption(spec, random.Random(int(digest[:16], 16)))


def prompt_words(prompt: str) -> list[str]:
    """The words of a prompt as the grammar and `locate_mentions` count them (lowercase alphanumerics)."""
    return _WORD.findall(prompt.lower())


def prompt_word_spans(prompt: str) -> list[tuple[int, int]]:
    """Character span of each of `prompt_words(prompt)`: `Mention` word indices map to text through it."""
    return [m.span() for m in _WORD.finditer(prompt.lower())]


def locate_mentions(prompt: str, spec: dict[str, Any]) -> list[Mention | None]:
    """Find each object group of `spec` in any prompt: `colour shape(s)` with its determiner and size words.

    Returns one entry per object group (None where the prompt does not name it that way), so a folder of
    generated images with free-form prompts still gets a positional breakdown where it can.
    """
    words = prompt_words(prompt)
    n = len(words)
    out: list[Mention | None] = []
    for idx, obj in enumerate(spec["objects"]):
        shape_words = {obj["shape"], PLURALS.get(obj["shape"], obj["shape"])}
        found: Mention | None = None
        for i in range(n - 1):
            if words[i] == obj["colour"] and words[i + 1] in shape_words:
                start = i
                while start > 0 and (words[start - 1] in _SIZE_VOCAB or words[start - 1] in _DETERMINERS):
                    start -= 1
                found = Mention(idx, start, i + 1, relative_position(start, i + 1, n))
                break
        out.append(found)
    return out


def known_vocabulary() -> set[str]:
    """Every word the grammar can produce (for tests and tokenizer sanity checks)."""
    vocab: set[str] = set(COLOURS) | set(SHAPES) | set(PLURALS.values()) | _DETERMINERS | _SIZE_VOCAB
    for group in (
        PREFIXES,
        SUFFIXES,
        CLAUSE_PREFIXES,
        ("there is", "there are", "and together with as well next to"),
    ):
        for phrase in group:
            vocab.update(phrase.split())
    for table in (REL_PHRASES, REL_PRONOUN):
        for phrases in table.values():
            for phrase in phrases:
                vocab.update(phrase.split())
    return vocab | {"with", "is", "are", "a"}
