"""Scene specs for the starter set: coloured shapes with exact ground truth.

A scene spec is a plain JSON-able dict (it is stored as the `spec` column of the starter Parquet shards and in
`specs.jsonl` of a generated-image folder)::

    {
      "kind": "single" | "count" | "pair" | "relation",
      "image_size": 64,
      "objects": [                      # groups: one colour + shape + size, `count` instances
        {"colour": "red", "shape": "circle", "size": "large", "count": 1,
         "boxes": [[x0, y0, x1, y1], ...]},    # pixel boxes of the instances (x1/y1 exclusive)
        ...
      ],
      "relation": {"subject": 0, "relation": "left_of", "object": 1} | null
    }

Only colour, shape, count and relation are needed to *score* an image against a spec; `size` and `boxes` are
what the renderer drew (a generated image may place objects anywhere).

Held-out split: every count or relation scene carries "combination keys" `(colour, shape, context)`, where the
context is the object's relation to the other object (`left_of`, `right_of`, `above`, `below`) or its count
(`x2`, `x3`, `x4`). A seeded subset of keys is held out: train scenes never contain one, held-out scenes contain
at least one. So "a red triangle left of something" can be held out while red triangles, triangles on the left
and everything else about it are seen in training.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

# Colours sit on a hue wheel and the background is black, so an antialiased edge pixel (a mix of a colour and the
# background) keeps the colour's direction in RGB space: the evaluator classifies by direction, not by distance.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 25, 25),
    "yellow": (235, 225, 20),
    "green": (25, 200, 25),
    "cyan": (20, 215, 215),
    "blue": (30, 50, 240),
    "purple": (200, 30, 220),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Bounding-box side in pixels at image_size 64. With the 4x VAE and patch 2 one generator token covers 8x8 px:
# at 12 / 19 px a small object was 1.5 tokens wide and its shape lived inside one token's latent values;
# 16 / 24 px gives every object 2-3 tokens a side (four small ones or a large pair still fit with clear gaps).
SIZES: dict[str, int] = {"small": 16, "large": 24}
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
INVERSE: dict[str, str] = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
COUNTS: tuple[int, ...] = (2, 3, 4)
KINDS: tuple[str, ...] = ("single", "count", "pair", "relation")
DEFAULT_KIND_WEIGHTS: dict[str, float] = {"single": 0.2, "count": 0.25, "pair": 0.15, "relation": 0.4}
SPLITS: tuple[str, ...] = ("train", "heldout")

ComboKey = tuple[str, str, str]  # (colour, shape, context)

_MARGIN = 2  # pixels kept free at the image border
_GAP = 4  # minimum free pixels between two objects, so same-colour objects never touch


def all_combo_keys() -> list[ComboKey]:
    """Every possible `(colour, shape, context)` key, in a fixed order."""
    contexts = list(RELATIONS) + [f"x{n}" for n in COUNTS]
    return [(c, s, ctx) for c in COLOURS for s in SHAPES for ctx in contexts]


def heldout_combos(seed: int, fraction: float) -> set[ComboKey]:
    """The seeded set of held-out keys: about `fraction` of all keys.

    At most one context is held out per (colour, shape) pair, so every pair keeps most of its contexts in
    training, and every colour, shape, relation and count stays seen in training.
    """
    rng = random.Random(f"heldout-combos:{seed}")
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    contexts = list(RELATIONS) + [f"x{n}" for n in COUNTS]
    n_keys = round(fraction * len(pairs) * len(contexts))
    n_keys = max(1, min(n_keys, len(pairs)))
    chosen = rng.sample(pairs, n_keys)
    # Spread contexts evenly over the chosen pairs (cycling a shuffled list) so no context is held out wholesale.
    ctx_order = contexts[:]
    rng.shuffle(ctx_order)
    return {(c, s, ctx_order[i % len(ctx_order)]) for i, (c, s) in enumerate(chosen)}


def combo_keys(spec: dict[str, Any]) -> set[ComboKey]:
    """The combination keys a spec contains (empty for single-object and pair scenes)."""
    keys: set[ComboKey] = set()
    objs = spec["objects"]
    if spec["kind"] == "count":
        for o in objs:
            keys.add((o["colour"], o["shape"], f"x{o['count']}"))
    rel = spec.get("relation")
    if rel:
        a, b = objs[rel["subject"]], objs[rel["object"]]
        keys.add((a["colour"], a["shape"], rel["relation"]))
        keys.add((b["colour"], b["shape"], INVERSE[rel["relation"]]))
    return keys


def relation_holds(
    a_center: tuple[float, float], b_center: tuple[float, float], relation: str, margin: float
) -> bool:
    """Whether "A <relation> B" holds for two centres (x, y; y grows downwards).

    The displacement along the relation's axis must exceed `margin` pixels in the right direction and dominate
    the displacement across it (so a far-below-and-slightly-left object is not "left of").
    """
    dx = b_center[0] - a_center[0]
    dy = b_center[1] - a_center[1]
    along, across = {
        "left_of": (dx, dy),
        "right_of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[relation]
    return along > margin and along >= abs(across)


def box_center(box: list[int] | tuple[int, ...]) -> tuple[float, float]:
    """Centre (x, y) of an `[x0, y0, x1, y1]` box."""
    return ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)


def _side(size: str, image_size: int) -> int:
    return max(4, round(SIZES[size] * image_size / 64))


def _overlaps(box: list[int], others: list[list[int]], gap: int) -> bool:
    return any(
        box[0] < o[2] + gap and o[0] < box[2] + gap and box[1] < o[3] + gap and o[1] < box[3] + gap
        for o in others
    )


def _place(
    rng: random.Random, side: int, image_size: int, taken: list[list[int]], gap: int, grid: int
) -> list[int] | None:
    hi = image_size - _MARGIN - side
    # On a grid, corners sit on its multiples (the border is the margin then); else anywhere inside the margin.
    corners = list(range(0, image_size - side + 1, grid)) if grid else None
    for _ in range(200):
        if corners:
            x0, y0 = rng.choice(corners), rng.choice(corners)
        else:
            x0, y0 = rng.randint(_MARGIN, hi), rng.randint(_MARGIN, hi)
        box = [x0, y0, x0 + side, y0 + side]
        if not _overlaps(box, taken, gap):
            return box
    return None


def _place_relation(
    rng: random.Random, side_a: int, side_b: int, relation: str, image_size: int, gap: int, grid: int
) -> tuple[list[int], list[int]] | None:
    # Clear separation: the along-axis centre distance is at least the half sides + gap + a few pixels, and the
    # across-axis offset at most half of it, so the relation is unambiguous by the evaluator's own test.
    for _ in range(400):
        a = _place(rng, side_a, image_size, [], gap, grid)
        b = _place(rng, side_b, image_size, [a], gap, grid) if a else None
        if a is None or b is None:
            continue
        ca, cb = box_center(a), box_center(b)
        min_along = (side_a + side_b) / 2 + gap
        if relation_holds(ca, cb, relation, margin=min_along):
            dx, dy = cb[0] - ca[0], cb[1] - ca[1]
            along, across = (abs(dx), abs(dy)) if relation in ("left_of", "right_of") else (abs(dy), abs(dx))
            if across <= 0.5 * along:
                return a, b
    return None


def _pick_object(rng: random.Random, exclude_colours: set[str] = frozenset()) -> dict[str, Any]:
    colour = rng.choice([c for c in COLOURS if c not in exclude_colours])
    return {"colour": colour, "shape": rng.choice(SHAPES), "size": rng.choice(list(SIZES)), "count": 1}


def _layout(rng: random.Random, spec: dict[str, Any], grid: int) -> bool:
    """Fill in `boxes` for every object; False when the sampled sizes do not fit (caller resamples)."""
    size = spec["image_size"]
    objs = spec["objects"]
    rel = spec.get("relation")
    if rel:
        a, b = objs[rel["subject"]], objs[rel["object"]]
        placed = _place_relation(
            rng, _side(a["size"], size), _side(b["size"], size), rel["relation"], size, _GAP, grid
        )
        if placed is None:
            return False
        a["boxes"], b["boxes"] = [placed[0]], [placed[1]]
        return True
    taken: list[list[int]] = []
    for o in objs:
        o["boxes"] = []
        for _ in range(o["count"]):
            box = _place(rng, _side(o["size"], size), size, taken, _GAP, grid)
            if box is None:
                return False
            taken.append(box)
            o["boxes"].append(box)
    return True


def _sample_kind(rng: random.Random, kind: str, image_size: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": kind, "image_size": image_size, "objects": [], "relation": None}
    if kind == "single":
        spec["objects"] = [_pick_object(rng)]
    elif kind == "count":
        o = _pick_object(rng)
        o["count"] = rng.choice(COUNTS)
        if o["count"] >= 4:
            o["size"] = "small"  # four large shapes rarely fit with clear gaps at 64x64
        spec["objects"] = [o]
    else:
        a = _pick_object(rng)
        # Different colours in two-object scenes, so colour and binding are separately testable.
        b = _pick_object(rng, exclude_colours={a["colour"]})
        spec["objects"] = [a, b]
        if kind == "relation":
            spec["relation"] = {"subject": 0, "relation": rng.choice(RELATIONS), "object": 1}
    return spec


def _from_key(rng: random.Random, key: ComboKey, image_size: int) -> dict[str, Any]:
    colour, shape, ctx = key
    obj = {"colour": colour, "shape": shape, "size": rng.choice(list(SIZES)), "count": 1}
    if ctx.startswith("x"):
        obj["count"] = int(ctx[1:])
        if obj["count"] >= 4:
            obj["size"] = "small"
        return {"kind": "count", "image_size": image_size, "objects": [obj], "relation": None}
    other = _pick_object(rng, exclude_colours={colour})
    return {
        "kind": "relation",
        "image_size": image_size,
        "objects": [obj, other],
        "relation": {"subject": 0, "relation": ctx, "object": 1},
    }


def sample_scene(
    seed: int,
    split: str,
    index: int,
    heldout: set[ComboKey],
    image_size: int = 64,
    kind_weights: dict[str, float] | None = None,
    grid: int = 0,
) -> dict[str, Any]:
    """The scene spec number `index` of `split`, a pure function of its arguments.

    Each scene draws from its own RNG (seeded by seed, split and index), so scene `i` does not depend on how many
    scenes are sampled: a small preset's scenes are a prefix of a large one's with the same seed.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    weights = kind_weights or DEFAULT_KIND_WEIGHTS
    digest = hashlib.sha256(f"scene:{seed}:{split}:{index}".encode()).hexdigest()
    rng = random.Random(int(digest[:16], 16))
    keys = sorted(heldout)
    for _ in range(1000):
        if split == "heldout":
            spec = _from_key(rng, rng.choice(keys), image_size)
        else:
            kind = rng.choices(list(weights), weights=list(weights.values()))[0]
            spec = _sample_kind(rng, kind, image_size)
            if combo_keys(spec) & heldout:
                continue
        if _layout(rng, spec, grid):
            return spec
    raise RuntimeError(f"could not lay out scene {split}/{index} (image_size={image_size} too small?)")


def sample_scenes(
    seed: int,
    split: str,
    n: int,
    heldout: set[ComboKey],
    image_size: int = 64,
    kind_weights: dict[str, float] | None = None,
    grid: int = 0,
    start: int = 0,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(id, spec)` for scenes `start` to `n` of a split; ids are stable (`train-000042`) and each scene is drawn
    from its own index, so any range draws what the whole split draws there."""
    for i in range(start, n):
        yield f"{split}-{i:06d}", sample_scene(seed, split, i, heldout, image_size, kind_weights, grid)


def describe(spec: dict[str, Any]) -> str:
    """A short canonical description of a spec, for logs and error messages."""
    parts = [f"{o['count']}x {o['colour']} {o['shape']}" for o in spec["objects"]]
    rel = spec.get("relation")
    if rel:
        return f"{parts[rel['subject']]} {rel['relation']} {parts[rel['object']]}"
    return " + ".join(parts)
