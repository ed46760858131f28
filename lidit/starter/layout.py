"""Text-side layout targets: where each object named in a caption stands, per prompt token.

An auxiliary training signal (ours, not the paper's; `model.layout_weight`, read by `GeneratorConfig.layout_head`
and `layout_attention`). Plain denoising MSE carries little of a relation: at high noise the best prediction under
"A left of B" is a blur over many layouts, and the `long` recipe placed 0.8 of held-out pairs the other way
round (it followed which side those objects had in training). Told per token, the text path learns the relation
and it generalises: the layout head reads the side right for 1.00 of the held-out relation captions by 5000
steps, and with layout attention the generator places every found held-out pair the named way round
(benchmarks/results/learning_curve.md, `long-layout`, `long-layout-attn`).
"""

from __future__ import annotations

from typing import Any

import torch

from lidit.starter.captions import locate_mentions, prompt_word_spans
from lidit.starter.scenes import box_center


def layout_targets(caption: str, spec: dict[str, Any], token_spans: list[tuple[int, int]]) -> torch.Tensor:
    """Per-token targets of one caption: (L, 2) for its `L` tokens, every one of them a target.

    In a relation caption, a token inside an object's mention (determiner, size, colour and shape words) gets
    that object's centre as an offset from the midpoint of the named objects, in quarter-image units (x right,
    y down; about +-1), so "A left of B" gives A's words a negative x and B's a positive one. Every other token,
    and every token of a caption without a relation (where its objects stand is not in its words), gets 0: "no
    place", which is also the best guess for objects placed at random.
    """
    targets = torch.zeros(len(token_spans), 2)
    if not spec.get("relation"):
        return targets
    spans = prompt_word_spans(caption)
    size = float(spec["image_size"])
    centres = [box_center(obj["boxes"][0]) for obj in spec["objects"]]
    mid_x = sum(c[0] for c in centres) / len(centres)
    mid_y = sum(c[1] for c in centres) / len(centres)
    for mention in locate_mentions(caption, spec):
        if mention is None:
            continue
        start, end = spans[mention.word_start][0], spans[mention.word_end][1]
        cx, cy = centres[mention.object_index]
        for k, (a, b) in enumerate(token_spans):
            if a < end and b > start:
                targets[k] = torch.tensor([(cx - mid_x) * 4 / size, (cy - mid_y) * 4 / size])
    return targets
