"""Small image utilities shared by training (sample grids), the quickstart and the evaluator CLI."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

LABEL_SPACING = 1  # px between label lines


Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: Font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than a whole line is broken between characters."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for ch in word:
            if line and draw.textlength(line + ch, font=font) > width:
                lines.append(line)
                line = ""
            line += ch
    if line:
        lines.append(line)
    return lines


def _clip_lines(
    lines: list[str], max_lines: int | None, draw: ImageDraw.ImageDraw, font: Font, width: int
) -> list[str]:
    """At most `max_lines` lines, the last one ending in "..." when text was cut."""
    if max_lines is None or len(lines) <= max_lines:
        return lines
    kept = lines[:max_lines]
    last = kept[-1]
    while last and draw.textlength(last + "...", font=font) > width:
        last = last[:-1]
    kept[-1] = last.rstrip() + "..."
    return kept


def make_grid(
    images: list[Image.Image],
    cols: int | None = None,
    pad: int = 2,
    labels: Sequence[str] | None = None,
    max_label_lines: int | None = None,
) -> Image.Image:
    """Tile equally sized images into one RGB grid with `pad` pixels of white between them.

    With `labels` (one string per image, e.g. its prompt), each tile gets its label under it in black, word-wrapped
    to the tile's width in PIL's default font, at most `max_label_lines` lines (None: all). Every label area has
    the height of the longest label, so rows stay aligned and a tile's label is always right under it.
    """
    if not images:
        raise ValueError("no images to tile")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    w, h = images[0].size
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    # Pillow's default: its bundled FreeType font (Aileron, 10 px) where FreeType is built in, else a bitmap font.
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    inset = 1  # px kept free at both sides of a label: antialiased glyph edges reach past their advance width
    text_w = max(1, w - 2 * inset)
    wrapped = [
        _clip_lines(_wrap(text, measure, font, text_w), max_label_lines, measure, font, text_w)
        for text in labels or []
    ]
    _, top, _, bottom = measure.textbbox((0, 0), "Ag", font=font)
    line_h = bottom - top + LABEL_SPACING
    label_h = max((len(lines) for lines in wrapped), default=0) * line_h
    cell_h = h + (label_h + pad if label_h else 0)
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = pad + c * (w + pad), pad + r * (cell_h + pad)
        grid.paste(im.convert("RGB"), (x, y))
        for n, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x + inset, y + h + pad + n * line_h - top), line, fill="black", font=font)
    return grid


def cover_crop(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """How a `width` x `height` image becomes a `bucket` (w, h): resized to cover it, `(resized_w, resized_h)`,
    then centre-cropped at `(left, top)`. The cache's pixels and its grounding boxes both follow this."""
    bw, bh = bucket
    s = max(bw / width, bh / height)
    rw, rh = max(bw, math.ceil(width * s)), max(bh, math.ceil(height * s))
    return rw, rh, (rw - bw) // 2, (rh - bh) // 2


def png_bytes(image: Image.Image) -> bytes:
    """PNG bytes of an image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
