"""The starter's grounded captions: which words of a caption name which object, for the layout targets
(`lidit.layout`).

Only relation captions state where their objects stand ("a red square to the left of a cyan circle"); every
other caption gets no grounding, so its tokens' target is 0 ("no place": the objects were placed at random).
"""

from __future__ import annotations

from typing import Any

from lidit.layout import Grounding
from lidit.starter.captions import locate_mentions, prompt_word_spans


def relation_grounding(caption: str, spec: dict[str, Any]) -> Grounding:
    """`[start, end, x0, y0, x1, y1]` per object mention of a relation caption (its determiner, size, colour
    and shape words; box normalised to the image), or `[]` for a caption without a relation."""
    if not spec.get("relation"):
        return []
    spans = prompt_word_spans(caption)
    size = float(spec["image_size"])
    out: Grounding = []
    for mention in locate_mentions(caption, spec):
        if mention is None:
            continue
        x0, y0, x1, y1 = (v / size for v in spec["objects"][mention.object_index]["boxes"][0])
        out.append((spans[mention.word_start][0], spans[mention.word_end][1], x0, y0, x1, y1))
    return out
