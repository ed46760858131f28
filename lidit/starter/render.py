"""Render a scene spec (see `scenes.py`) to an RGB image with PIL."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, ImageDraw

from lidit.starter.scenes import BACKGROUND, COLOURS

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: antialiased edges that are exact colour/background mixes


def shape_polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    """Polygon vertices of `shape` inside `box` (x0, y0, x1, y1); None for shapes drawn as ellipses."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":  # apex up
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill: Any
) -> None:
    """Draw a filled `shape` in `box` (pixel coordinates, x1/y1 exclusive)."""
    x0, y0, x1, y1 = box
    poly = shape_polygon(shape, (x0, y0, x1 - 1, y1 - 1))
    if poly is None:
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def render(spec: dict[str, Any]) -> Image.Image:
    """Render `spec` to an `image_size` x `image_size` RGB image on the plain background."""
    size = int(spec["image_size"])
    big = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in spec["objects"]:
        for box in obj["boxes"]:
            scaled = tuple(v * _SUPERSAMPLE for v in box)
            draw_shape(draw, obj["shape"], scaled, COLOURS[obj["colour"]])
    return canvas.resize((size, size), Image.Resampling.BOX)


def to_png(image: Image.Image) -> bytes:
    """PNG bytes of an image (deterministic for the same pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def from_png(data: bytes) -> Image.Image:
    """Decode PNG (or any PIL-readable) bytes to an RGB image."""
    return Image.open(io.BytesIO(data)).convert("RGB")
