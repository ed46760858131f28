"""Per-token layout targets from grounded captions: where each phrase's object stands, per prompt token.

An auxiliary training signal (ours, not the paper's; `model.layout_weight`, read by `GeneratorConfig.layout_head`
and `layout_attention`). Plain denoising MSE carries little of a relation: at high noise the best prediction under
"A left of B" is a blur over many layouts, and the `long` recipe placed 0.8 of held-out pairs the other way
round. Told per token, the text path learns the relation and it generalises to held-out combinations
(benchmarks/results/learning_curve.md, `long-layout-attn`).

A *grounding* of a caption lists the phrases whose place the caption states, GRIT-style: one
`[start, end, x0, y0, x1, y1]` per phrase, a character span of the caption and the phrase's box in image
coordinates normalised to [0, 1] (x right, y down). Captions that state no place have none (`[]` or null).
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import torch

from lidit.images import cover_crop

# Bumped when `grounding_targets` changes what it computes: caches rebuild their layout columns.
TARGETS_VERSION = 1

Grounding = list[tuple[int, int, float, float, float, float]]


class LayoutTargets(NamedTuple):
    """Per-token layout targets of a batch, one entry per generator branch in its order: `targets` (B, L_b, 2)
    and `mask` (B, L_b) bool over that branch's padded prompt tokens (prefix excluded)."""

    targets: list[torch.Tensor]
    mask: list[torch.Tensor]

    def padded_to(self, lengths: list[int]) -> LayoutTargets:
        """Each branch's token axis padded to `lengths` with tokens that have no target: the targets of a batch
        whose prompt tokens were re-padded to longer rows stacked with it (hard-negative captions)."""
        targets, masks = [], []
        for target, mask, length in zip(self.targets, self.mask, lengths, strict=True):
            extra = length - target.shape[1]
            targets.append(torch.cat([target, target.new_zeros(target.shape[0], extra, 2)], dim=1))
            masks.append(torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1))
        return LayoutTargets(targets, masks)


def parse_grounding(value: Any, caption: str) -> Grounding:
    """A grounding from its stored form (a list of 6-number lists, or that list as JSON text; None = none),
    checked against its caption. Raises ValueError saying what is wrong."""
    if value is None:
        return []
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"grounding is not JSON: {exc}") from None
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ValueError(
            f"grounding must be a list of [start, end, x0, y0, x1, y1], got {type(value).__name__}"
        )
    out: Grounding = []
    for k, phrase in enumerate(value):
        if not isinstance(phrase, list | tuple) or len(phrase) != 6:
            raise ValueError(f"grounding phrase {k}: expected [start, end, x0, y0, x1, y1], got {phrase!r}")
        start, end, x0, y0, x1, y1 = phrase
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in phrase):
            raise ValueError(f"grounding phrase {k}: non-numeric or non-finite value in {phrase!r}")
        if start != int(start) or end != int(end) or not 0 <= start < end <= len(caption):
            raise ValueError(
                f"grounding phrase {k}: span [{start}, {end}) outside the caption's {len(caption)} chars"
            )
        if not (0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1):
            raise ValueError(
                f"grounding phrase {k}: box {[x0, y0, x1, y1]} is not inside [0, 1] with x0<=x1, y0<=y1"
            )
        out.append((int(start), int(end), float(x0), float(y0), float(x1), float(y1)))
    return out


def crop_grounding(grounding: Grounding, width: int, height: int, bucket: tuple[int, int]) -> Grounding:
    """The grounding of a `width` x `height` image in its bucket crop (resize to cover the bucket, then centre
    crop: `lidit.images.cover_crop`, as the cache's pixels). Boxes stay in crop-normalised units; a phrase cut by
    the crop may reach outside [0, 1], which the targets accept (its centre is still where it stands)."""
    bw, bh = bucket
    rw, rh, left, top = cover_crop(width, height, bucket)

    def x(v: float) -> float:
        return (v * rw - left) / bw

    def y(v: float) -> float:
        return (v * rh - top) / bh

    return [(a, b, x(x0), y(y0), x(x1), y(y1)) for a, b, x0, y0, x1, y1 in grounding]


def grounding_targets(grounding: Grounding, token_spans: list[tuple[int, int]]) -> torch.Tensor:
    """Per-token targets (L, 2) of one caption's `L` tokens, every one of them a target.

    A token overlapping a grounded phrase gets that phrase's box centre as an offset from the midpoint of all
    the phrases' centres, in quarter-image units (about +-1), so "A left of B" gives A's words a negative x and
    B's a positive one. Every other token, and every token of a caption with fewer than two grounded phrases,
    gets 0: "no place", also the best guess for objects placed at random.
    """
    targets = torch.zeros(len(token_spans), 2)
    if len(grounding) < 2:
        return targets
    centres = [((x0 + x1) / 2, (y0 + y1) / 2) for _, _, x0, y0, x1, y1 in grounding]
    mid_x = sum(c[0] for c in centres) / len(centres)
    mid_y = sum(c[1] for c in centres) / len(centres)
    for (start, end, *_), (cx, cy) in zip(grounding, centres, strict=True):
        for k, (a, b) in enumerate(token_spans):
            if a < end and b > start:
                targets[k] = torch.tensor([(cx - mid_x) * 4, (cy - mid_y) * 4])
    return targets
