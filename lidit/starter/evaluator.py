"""A deterministic GenEval-style scorer for coloured-shape images against their prompt specs.

Detection is classical image processing, no model: every pixel is classified by its colour *direction* from the
background (an antialiased or faded pixel keeps its colour's direction), kept when it is at least half-way from
the background to that colour, and grouped into 8-connected blobs per colour.

A blob gets a shape only when it *is* a discrete shape; otherwise its shape is "unknown" (it still counts for
`colour`). Some template always fits a blob best, so without these tests noise and soft blobs earned shape
labels (noise images scored shape 0.5-0.8, soft blobs 0.35, the starter VAE's decodes of random latents 0.9).
Each test rejects one kind of impostor; the `noise` and `blobs` controls of `control_reports` and
`tests/lidit/starter/test_evaluator.py` hold the measurements:

- size: the blob's implied bounding side is within the object sizes of `scenes.SIZES`, with slack (specks of
  noise and colour floods are not objects);
- isolation: the ring 2-3 px outside its half-coverage outline is mostly background. A drawn object ends within
  a pixel or two of that outline, even blurred by a VAE; noise is surrounded by other colours and a Gaussian
  blob by its own long faint tail. This is what stops smooth noise, whose plateaus can fit a template well;
- fit: the soft coverage matches a shape template drawn with the blob's mass at its centroid, sharp or blurred
  by 0.6 or 1.2 px, at IoU >= `MIN_IOU`. Comparing a blurry reconstruction with a blurry template keeps real
  shapes far above the bar, while irregular blobs and decoded random latents stay below it;
- margin: that IoU beats the best other shape's by `MIN_MARGIN` (a blob as much a circle as a diamond is
  neither).

Categories (each image is scored on the ones that apply to its spec):

- `colour`:   every object group's colour is present (on any shape);
- `shape`:    every group's shape is present (in any colour);
- `binding`:  every group is present as a blob with both its colour and its shape;
- `count`:    (count prompts) the number of blobs with the group's colour and shape equals the count;
- `position`: (relation prompts) the two named objects stand in the named relation.

`overall` per image: every group appears exactly `count` times with its colour and shape, and the relation (if
any) holds. Reports give the mean over images of each, per scene kind, and per object by where the object is
mentioned in the prompt (`first` / `middle` / `last` third; see `captions.locate_mentions`).

A folder of generated images is scored from `specs.jsonl` beside the images, one JSON object per line:
`{"file": "000000.png", "prompt": "...", "spec": {...}}` (see `write_image_folder`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lidit.starter.captions import locate_mentions, position_bin
from lidit.starter.render import draw_shape
from lidit.starter.scenes import BACKGROUND, COLOURS, SHAPES, SIZES, relation_holds

CATEGORIES: tuple[str, ...] = ("colour", "shape", "binding", "count", "position")
POSITION_BINS: tuple[str, ...] = ("first", "middle", "last")
SPECS_FILE = "specs.jsonl"
ScoredItem = tuple[Image.Image | np.ndarray, dict[str, Any], str | None]  # (image, spec, prompt)

_COLOUR_NAMES = list(COLOURS)
_BG = np.asarray(BACKGROUND, dtype=np.float32) / 255.0
_DIRS = np.stack([np.asarray(COLOURS[c], dtype=np.float32) / 255.0 - _BG for c in _COLOUR_NAMES])  # (K, 3)
_NORMS = np.linalg.norm(_DIRS, axis=1)  # (K,)
_UNIT = _DIRS / _NORMS[:, None]

MIN_ALPHA = 0.5  # fraction of the way from background to the colour for a pixel to count as the object
MIN_COS = 0.9  # cosine to the nearest palette direction; greys and whites are not palette colours
MIN_AREA_FRAC = 12 / (64 * 64)  # blobs smaller than this fraction of the image are noise
RELATION_MARGIN_FRAC = 2 / 64  # centres must differ by this fraction of the width along the relation axis
# Shape tests (see the module docstring), measured per blob. Best IoU: renders >= 0.93 (lead >= 0.10), blurred
# 1.2 px and JPEG'd >= 0.88 (lead >= 0.026), the starter VAE's round trips of 12/19 px objects >= 0.83 (small
# diamonds and circles come back alike: 1% of blobs lead by < 0.008). Blobs that pass size and isolation: soft
# blobs <= 0.79, decoded random latents <= 0.80. Smooth noise fits up to 0.96 but fails isolation.
MIN_IOU = 0.8  # best blur-matched template IoU below this: shape "unknown"
MIN_MARGIN = 0.01  # IoU lead over the best other shape below this: "unknown" (a tie is no shape)
TEMPLATE_BLURS: tuple[float, ...] = (0.0, 0.6, 1.2)  # Gaussian sigmas (px) the templates are tried at
# Implied bounding side as a fraction of the image width: 2/3 of the small object size to 1.5x the large one
# (`scenes.SIZES` at 64 px), room for a generator that draws objects a little small or large.
SIDE_RANGE_FRAC = (2 / 3 * min(SIZES.values()) / 64, 1.5 * max(SIZES.values()) / 64)
RING = (2, 3)  # px (Chebyshev) outside the half-coverage outline that must be background
CLEAR_LEVEL = 0.25  # RGB distance from the background below which a ring pixel is background
# Fraction of the ring that must be background: real objects measure >= 0.91, noise and blobs that fit a template
# at IoU >= 0.8 <= 0.63; the slack lets another object touch a quarter of the ring (pressed closer: no shape).
MIN_CLEAR_RING = 0.75


@dataclass(frozen=True)
class Detection:
    """One detected blob."""

    colour: str
    shape: str
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    center: tuple[float, float]  # centroid x, y
    iou: float  # IoU with the best shape template (0 when the blob failed the size or isolation test)
    margin: float  # that IoU minus the best other shape's


@dataclass
class ImageScore:
    """Pass/fail of one image against its spec."""

    kind: str
    categories: dict[str, bool]  # only the categories that apply
    overall: bool
    # Per object group: ok (exact count with colour and shape), rel_pos and bin (None where the prompt does not
    # name the object the grammar's way).
    objects: list[dict[str, Any]]
    detections: list[Detection] = field(default_factory=list)
    # Relation scenes with both named objects found: "holds", "inverse" (placed the other way round) or
    # "neither"; None otherwise. Tells a model that ignores the relation from one that follows a prior.
    relation: str | None = None


@dataclass
class EvalReport:
    """Aggregate accuracies over a set of scored images."""

    n_images: int
    overall: float | None  # None for an empty set
    categories: dict[str, dict[str, float]]  # name -> {"acc", "n"}
    kinds: dict[str, dict[str, float]]  # scene kind -> {"acc", "n"} (overall accuracy)
    by_position: dict[str, dict[str, float]]  # first/middle/last -> {"acc", "n"} (objects)
    # Over relation scenes whose two objects were both found: share where the relation holds / is inverted.
    relation_direction: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32)  # assume floats in [0, 1]


def _label_components(labels: np.ndarray) -> np.ndarray:
    """8-connected components of equal non-negative labels; returns component ids (-1 for background).

    Each pixel holds the index of a pixel of its component (at first itself); passes take the minimum over
    same-label neighbours, then jump pointers (`comp = comp[comp]`, valid since every id is at most its own
    pixel's index), so a pass halves the remaining distance instead of moving it by one pixel.
    """
    h, w = labels.shape
    fg = labels >= 0
    big = h * w
    comp = np.where(fg, np.arange(h * w, dtype=np.int64).reshape(h, w), big)
    padded_lab = np.pad(labels, 1, constant_values=-1)
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    same = [(padded_lab[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] == labels) & fg for dy, dx in shifts]
    padded = np.full((h + 2, w + 2), big, dtype=np.int64)
    while True:
        padded[1:-1, 1:-1] = comp
        new = comp
        for (dy, dx), ok in zip(shifts, same, strict=True):
            nb = padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            new = np.where(ok, np.minimum(new, nb), new)
        flat = np.append(new.ravel(), big)  # index `big` (background) maps to itself
        for _ in range(4):
            flat = flat[flat]
        new = flat[:-1].reshape(h, w)
        if np.array_equal(new, comp):
            break
        comp = new
    return np.where(fg, comp, -1)


@lru_cache(maxsize=512)
def _band(n: int, r: int) -> np.ndarray:
    """(n, n) matrix of ones where |i - j| <= r: `band @ x` sums each column over a window of 2r+1 rows."""
    i = np.arange(n)
    return (np.abs(i[:, None] - i[None, :]) <= r).astype(np.float32)


@lru_cache(maxsize=512)
def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix that blurs the columns of an (n, ...) array with a Gaussian, zero outside the array."""
    i = np.arange(n)
    kernel = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    taps = np.exp(-0.5 * (np.arange(-n + 1, n) / sigma) ** 2)
    return (kernel / taps.sum()).astype(np.float32)  # unit mass away from the edges


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilation by a (2r+1)-square. The square is separable, so it is two band-matrix products: on these small
    windows that is far faster than shifting and OR-ing (2r+1)^2 copies."""
    h, w = mask.shape
    return (_band(h, r) @ mask.astype(np.float32) @ _band(w, r)) > 0.5


def _gaussian_blur(arr: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the last two axes (zero outside; callers leave a margin of 3 sigma), as two matrix
    products."""
    h, w = arr.shape[-2:]
    return _gauss_matrix(h, sigma) @ arr @ _gauss_matrix(w, sigma)


def _shape_side(shape: str, area: float) -> float:
    """Side of the bounding square of `shape` with the given area."""
    factor = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}[shape]
    return float(np.sqrt(area / factor))


def _templates(mass: float, center: tuple[float, float], w: int, h: int) -> np.ndarray:
    """Coverage (0..1) of every shape with area `mass` centred (by centroid) on `center` in a w x h window, at
    every sigma of `TEMPLATE_BLURS`: (len(SHAPES), len(TEMPLATE_BLURS), h, w)."""
    scale = 4  # supersampling like the renderer
    m = int(np.ceil(3 * max(TEMPLATE_BLURS)))  # a margin so the blur does not lose mass at the window edges
    big = (w + 2 * m, h + 2 * m)
    sharp = []
    for shape in SHAPES:
        side = _shape_side(shape, mass)
        # A triangle's centroid sits 2/3 of the way down from its apex.
        y0 = center[1] - (2 * side / 3 if shape == "triangle" else side / 2) + m
        x0 = center[0] - side / 2 + m
        canvas = Image.new("L", (big[0] * scale, big[1] * scale), 0)
        box = (x0 * scale, y0 * scale, (x0 + side) * scale, (y0 + side) * scale)
        draw_shape(ImageDraw.Draw(canvas), shape, box, 255)
        sharp.append(np.asarray(canvas.resize(big, Image.Resampling.BOX), dtype=np.float32) / 255.0)
    stack = np.stack(sharp)  # (S, H + 2m, W + 2m)
    blurred = [stack if sigma <= 0 else _gaussian_blur(stack, sigma) for sigma in TEMPLATE_BLURS]
    return np.stack(blurred, axis=1)[:, :, m : m + h, m : m + w]  # (S, B, h, w)


def shape_ious(soft: np.ndarray, support: np.ndarray | None = None) -> dict[str, float]:
    """Soft IoU of a blob's coverage (0..1 in a window around it) with each shape's template, best over blurs.

    Each template has the blob's mass (sum of coverage) and is centred on the blob's centroid: both survive
    blur and antialiasing, unlike a bounding box (blur eats a diamond's tips and makes its box look round).
    Trying the template blurred as well as sharp means a blurry reconstruction is compared with a blurry shape,
    not penalised for its soft edges; a blob's irregular outline still fits no blur. `support` (bool, same
    shape) limits the comparison to where the blob's coverage was collected.
    """
    h, w = soft.shape
    mass = float(soft.sum())
    if mass <= 0:
        return dict.fromkeys(SHAPES, 0.0)
    tpl = _templates(mass, _centroid(soft), w, h)  # (S, B, h, w)
    if support is not None:
        tpl = np.where(support, tpl, 0.0)
    inter = np.minimum(soft, tpl).sum(axis=(2, 3))
    union = np.maximum(soft, tpl).sum(axis=(2, 3))
    ious = (inter / np.maximum(union, 1e-9)).max(axis=1)  # (S,)
    return {shape: float(v) for shape, v in zip(SHAPES, ious, strict=True)}


def classify_shape(soft: np.ndarray, support: np.ndarray | None = None) -> tuple[str, float, float]:
    """`(shape, iou, margin)` of a blob's soft coverage: the best-fitting shape, its IoU and its lead over the
    runner-up; the shape is "unknown" unless the IoU reaches `MIN_IOU` and the lead `MIN_MARGIN`."""
    ious = shape_ious(soft, support)
    ranked = sorted(ious.items(), key=lambda kv: -kv[1])
    (best, iou), (_, second) = ranked[0], ranked[1]
    margin = iou - second
    return (best if iou >= MIN_IOU and margin >= MIN_MARGIN else "unknown"), iou, margin


def _centroid(soft: np.ndarray) -> tuple[float, float]:
    """Coverage-weighted centre (x, y) of a window, in pixel units (pixel centres at +0.5)."""
    mass = float(soft.sum())
    h, w = soft.shape
    cx = float(soft.sum(axis=0) @ (np.arange(w) + 0.5)) / mass
    cy = float(soft.sum(axis=1) @ (np.arange(h) + 0.5)) / mass
    return cx, cy


def _size_ok(mass: float, width: int) -> bool:
    """Whether a blob of this mass can be an object: some shape's implied side is within `SIDE_RANGE_FRAC`.

    The implied sides run from sqrt(mass) (square) to sqrt(2 mass) (triangle, diamond), the circle's between,
    and the range is wider than that factor, so "some shape fits" is "the two intervals overlap".
    """
    lo, hi = (f * width for f in SIDE_RANGE_FRAC)
    return np.sqrt(mass) <= hi and np.sqrt(2 * mass) >= lo


def _ring_clear(mask: np.ndarray, dist: np.ndarray) -> float:
    """Fraction of the ring `RING` px outside `mask` (bool window) where `dist` (RGB distance from the
    background, same window) is under `CLEAR_LEVEL`; 1.0 when the ring is empty (blob fills the window)."""
    inner, outer = RING
    ring = _dilate(mask, outer) & ~_dilate(mask, inner - 1)
    vals = dist[ring]
    return float((vals < CLEAR_LEVEL).mean()) if vals.size else 1.0


def detect_objects(image: Image.Image | np.ndarray) -> list[Detection]:
    """Detect coloured blobs in an RGB image (PIL or uint8/float array), largest first."""
    arr = _as_array(image)
    h, w, _ = arr.shape
    d = arr - _BG  # (H, W, 3)
    proj = d @ _UNIT.T  # (H, W, K)
    k = proj.argmax(-1)
    best = np.take_along_axis(proj, k[..., None], -1)[..., 0]
    norm = np.linalg.norm(d, axis=-1)
    cos = best / np.maximum(norm, 1e-6)
    alpha = np.clip(best / _NORMS[k], 0.0, 1.0)
    labels = np.where((alpha >= MIN_ALPHA) & (cos >= MIN_COS), k, -1)
    comp = _label_components(labels)
    min_area = max(3, round(MIN_AREA_FRAC * h * w))
    pad = RING[1]  # soft edges of a blurred blob reach about this far past its half-coverage outline
    out: list[Detection] = []
    # Boxes of all components at once (noise has hundreds): a component's id is its first pixel's index.
    flat = np.flatnonzero(comp >= 0)
    ids, inverse, counts = np.unique(comp.ravel()[flat], return_inverse=True, return_counts=True)
    fy, fx = np.divmod(flat, w)
    bx0, by0 = np.full(len(ids), w), np.full(len(ids), h)
    bx1, by1 = np.zeros(len(ids), np.int64), np.zeros(len(ids), np.int64)
    np.minimum.at(bx0, inverse, fx)
    np.minimum.at(by0, inverse, fy)
    np.maximum.at(bx1, inverse, fx + 1)
    np.maximum.at(by1, inverse, fy + 1)
    for j in np.flatnonzero(counts >= min_area).tolist():
        cid, area = int(ids[j]), int(counts[j])
        x0, y0, x1, y1 = int(bx0[j]), int(by0[j]), int(bx1[j]), int(by1[j])
        colour_idx = int(labels.flat[cid])
        wx0, wy0, wx1, wy1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
        region = comp[wy0:wy1, wx0:wx1]
        mask = region == cid
        near = _dilate(mask, pad) & (mask | (region < 0))
        soft = np.where(near & (k[wy0:wy1, wx0:wx1] == colour_idx), alpha[wy0:wy1, wx0:wx1], 0.0)
        mass = float(soft.sum())
        # The cheap tests first: most noise blobs fail on size or isolation before any template is drawn.
        if _size_ok(mass, w) and _ring_clear(mask, norm[wy0:wy1, wx0:wx1]) >= MIN_CLEAR_RING:
            shape, iou, margin = classify_shape(soft, near)
        else:
            shape, iou, margin = "unknown", 0.0, 0.0
        cx, cy = _centroid(soft)
        center = (wx0 + cx, wy0 + cy)
        out.append(
            Detection(
                _COLOUR_NAMES[colour_idx],
                shape,
                area,
                (x0, y0, x1, y1),
                center,
                round(iou, 4),
                round(margin, 4),
            )
        )
    out.sort(key=lambda det: -det.area)
    return out


def score_image(
    image: Image.Image | np.ndarray, spec: dict[str, Any], prompt: str | None = None
) -> ImageScore:
    """Score one image against its spec; `prompt` (optional) gives the positional breakdown."""
    dets = detect_objects(image)
    groups = spec["objects"]
    width = _as_array(image).shape[1] if not isinstance(image, Image.Image) else image.width
    matches = [[det for det in dets if det.colour == g["colour"] and det.shape == g["shape"]] for g in groups]
    exact = [len(m) == int(g["count"]) for m, g in zip(matches, groups, strict=True)]
    cats: dict[str, bool] = {
        "colour": all(any(det.colour == g["colour"] for det in dets) for g in groups),
        "shape": all(any(det.shape == g["shape"] for det in dets) for g in groups),
        "binding": all(len(m) > 0 for m in matches),
    }
    if spec.get("kind") == "count" or any(int(g["count"]) > 1 for g in groups):
        cats["count"] = all(exact)
    rel = spec.get("relation")
    position_ok = True
    direction = None
    if rel:
        a, b = matches[rel["subject"]], matches[rel["object"]]
        margin = RELATION_MARGIN_FRAC * width
        if a and b:
            holds = relation_holds(a[0].center, b[0].center, rel["relation"], margin=margin)
            inverse = relation_holds(b[0].center, a[0].center, rel["relation"], margin=margin)
            direction = "holds" if holds else "inverse" if inverse else "neither"
        position_ok = direction == "holds"
        cats["position"] = position_ok
    mentions = locate_mentions(prompt, spec) if prompt else [None] * len(groups)
    objects = [
        {
            "ok": ok,
            "rel_pos": None if m is None else round(m.rel_pos, 4),
            "bin": None if m is None else position_bin(m.rel_pos),
        }
        for ok, m in zip(exact, mentions, strict=True)
    ]
    return ImageScore(
        kind=str(spec.get("kind", "unknown")),
        categories=cats,
        overall=all(exact) and position_ok,
        objects=objects,
        detections=dets,
        relation=direction,
    )


def _acc(flags: list[bool]) -> dict[str, Any]:
    # None, not NaN, when nothing applies: the report must stay valid JSON.
    return {"acc": round(sum(flags) / len(flags), 4) if flags else None, "n": len(flags)}


def aggregate(scores: Iterable[ImageScore]) -> EvalReport:
    """Mean accuracies over scored images (per category only over images where it applies)."""
    scores = list(scores)
    cats: dict[str, list[bool]] = defaultdict(list)
    kinds: dict[str, list[bool]] = defaultdict(list)
    bins: dict[str, list[bool]] = {b: [] for b in POSITION_BINS}
    for s in scores:
        for name, ok in s.categories.items():
            cats[name].append(ok)
        kinds[s.kind].append(s.overall)
        for obj in s.objects:
            if obj["bin"] is not None:
                bins[obj["bin"]].append(obj["ok"])
    return EvalReport(
        n_images=len(scores),
        overall=_acc([s.overall for s in scores])["acc"],
        categories={c: _acc(cats[c]) for c in CATEGORIES if c in cats},
        kinds={k: _acc(v) for k, v in sorted(kinds.items())},
        by_position={b: _acc(v) for b, v in bins.items()},
        relation_direction={
            d: _acc([s.relation == d for s in scores if s.relation is not None]) for d in ("holds", "inverse")
        },
    )


def score_images(
    items: Iterable[tuple[Image.Image | np.ndarray, dict[str, Any], str | None]],
) -> EvalReport:
    """Score `(image, spec, prompt)` triples and aggregate."""
    return aggregate(score_image(img, spec, prompt) for img, spec, prompt in items)


def write_image_folder(
    folder: str | Path,
    items: Iterable[tuple[Image.Image, str, dict[str, Any]]],
    names: list[str] | None = None,
) -> Path:
    """Write `(image, prompt, spec)` triples as the folder format `score_folder` reads (PNGs + specs.jsonl)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, prompt, spec) in enumerate(items):
        name = names[i] if names else f"{i:06d}.png"
        image.save(folder / name)
        lines.append(json.dumps({"file": name, "prompt": prompt, "spec": spec}, sort_keys=True))
    (folder / SPECS_FILE).write_text("\n".join(lines) + ("\n" if lines else ""))
    return folder


def read_image_folder(folder: str | Path) -> list[tuple[Image.Image, dict[str, Any], str | None]]:
    """Load `(image, spec, prompt)` triples from a folder written by `write_image_folder` (or by hand)."""
    folder = Path(folder)
    specs = folder / SPECS_FILE
    if not specs.is_file():
        raise FileNotFoundError(
            f"{specs} not found: a folder to score holds images plus {SPECS_FILE} with one "
            '{"file": ..., "prompt": ..., "spec": {...}} object per line'
        )
    out = []
    for n, line in enumerate(specs.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            spec = row["spec"] if isinstance(row["spec"], dict) else json.loads(row["spec"])
            path = folder / row["file"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{specs}:{n}: bad line ({exc})") from exc
        with Image.open(path) as im:
            out.append((im.convert("RGB"), spec, row.get("prompt")))
    return out


def score_folder(folder: str | Path) -> EvalReport:
    """Score a folder of generated images with their `specs.jsonl`."""
    return score_images(read_image_folder(folder))


def recolour(image: Image.Image | np.ndarray, shift: int = 3) -> Image.Image:
    """Move every palette-coloured pixel `shift` steps round the colour wheel, keeping its coverage (a control:
    shapes and layout stay right, every colour becomes wrong)."""
    arr = _as_array(image)
    d = arr - _BG
    proj = d @ _UNIT.T
    k = proj.argmax(-1)
    best = np.take_along_axis(proj, k[..., None], -1)[..., 0]
    cos = best / np.maximum(np.linalg.norm(d, axis=-1), 1e-6)
    alpha = np.clip(best / _NORMS[k], 0.0, 1.0)
    moved = _BG + alpha[..., None] * _DIRS[(k + shift) % len(_COLOUR_NAMES)]
    out = np.where((cos >= MIN_COS)[..., None] & (alpha > 0)[..., None], moved, arr)
    return Image.fromarray(np.round(np.clip(out, 0, 1) * 255).astype(np.uint8))


def blank_like(image: Image.Image | np.ndarray) -> Image.Image:
    """A plain background image of the same size (a control: nothing to find)."""
    h, w, _ = _as_array(image).shape
    return Image.new("RGB", (w, h), BACKGROUND)


NOISE_KINDS: tuple[str, ...] = ("pixel", "smooth")
_PALETTE = np.stack([np.asarray(COLOURS[c], dtype=np.float32) / 255.0 for c in _COLOUR_NAMES])  # (K, 3)


def noise_like(image: Image.Image | np.ndarray, rng: np.random.Generator, kind: str = "pixel") -> Image.Image:
    """A noise image of the same size (a control: colour everywhere, no discrete shape anywhere).

    `pixel`: a random palette colour at a random intensity per pixel, or per 2x2 or 4x4 cell (cells make
    same-coloured runs big enough to pass the area test). `smooth`: random RGB on a coarse grid (cells of 4, 8
    or 16 px, darker or brighter on average) upsampled bicubically: the low-frequency colour fields that an
    untrained generator decodes to, with blob-sized regions of palette colours.
    """
    h, w, _ = _as_array(image).shape
    if kind == "pixel":
        cell = int(rng.choice([1, 2, 4]))
        ch, cw = -(-h // cell), -(-w // cell)
        cells = _BG + rng.random((ch, cw, 1)) * (_PALETTE[rng.integers(0, len(_PALETTE), (ch, cw))] - _BG)
        arr = np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)[:h, :w]
        return Image.fromarray(np.round(arr * 255).astype(np.uint8))
    if kind == "smooth":
        cell = int(rng.choice([4, 8, 16]))
        coarse = rng.normal(rng.uniform(0.0, 0.5), 0.5, (max(2, h // cell), max(2, w // cell), 3))
        small = Image.fromarray(np.round(np.clip(coarse, 0, 1) * 255).astype(np.uint8))
        return small.resize((w, h), Image.Resampling.BICUBIC)
    raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")


def blobs_like(
    image: Image.Image | np.ndarray, spec: dict[str, Any], rng: np.random.Generator, extra: int = 3
) -> Image.Image:
    """Soft, irregular blobs in the spec's colours (a control: right colours and counts, no discrete shape).

    One blob per object instance of the spec plus up to `extra` more, each the union of 1-3 anisotropic Gaussian
    lobes (random widths, orientations, offsets, peak intensities 0.6-1.3 clipped to full colour) spread over a
    box of an object's size (`scenes.SIZES`): what a generator that has learnt "a red thing of about this size"
    but no shape draws. The first blobs take the spec's colours, the extras random palette colours.
    """
    h, w, _ = _as_array(image).shape
    colours = [_COLOUR_NAMES.index(g["colour"]) for g in spec["objects"] for _ in range(int(g["count"]))]
    colours += rng.integers(0, len(_PALETTE), int(rng.integers(0, extra + 1))).tolist()
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    arr = np.broadcast_to(_BG, (h, w, 3)).copy()
    for colour in colours:
        side = float(rng.choice(list(SIZES.values()))) * w / 64
        cx, cy = rng.uniform(side / 2, w - side / 2), rng.uniform(side / 2, h - side / 2)
        cover = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            sx, sy = rng.uniform(0.15, 0.35, 2) * side
            theta = rng.uniform(0, np.pi)
            ox, oy = rng.uniform(-0.25, 0.25, 2) * side
            dx, dy = xs - cx - ox, ys - cy - oy
            u, v = dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)
            lobe = rng.uniform(0.6, 1.3) * np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
            cover = np.maximum(cover, lobe)
        blob = _BG + np.clip(cover, 0, 1)[..., None] * (_PALETTE[colour] - _BG)
        arr = np.maximum(arr, blob)  # overlapping blobs mix channel-wise, like paint on black
    return Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8))


CONTROLS: tuple[str, ...] = ("shuffled_prompts", "recoloured", "blank", "noise", "blobs")


def _control_rng(seed: int, control: str, index: int) -> np.random.Generator:
    # One generator per (control, item): item i's control image does not depend on how many items there are.
    return np.random.default_rng([seed, int.from_bytes(control.encode(), "little"), index])


def control_reports(
    items: list[tuple[Image.Image | np.ndarray, dict[str, Any], str | None]],
    seed: int = 0,
    names: Iterable[str] | None = None,
) -> dict[str, EvalReport]:
    """Scores of deliberately wrong pairs built from real `(image, spec, prompt)` items, each against the real
    prompts: each image with another image's prompt (`shuffled_prompts`), recoloured images (`recoloured`),
    blank images (`blank`), noise images (`noise`: `pixel` and `smooth` noise on alternate items, see
    `noise_like`) and soft blobs in the prompt's colours (`blobs`, see `blobs_like`). `names` picks some of
    `CONTROLS` (default: all; noise and blobs cost the most, a few ms an image).

    A generator's scores mean something only where these sit near 0 (shuffled prompts: near chance).
    """
    names = list(CONTROLS if names is None else names)
    unknown = sorted(set(names) - set(CONTROLS))
    if unknown:
        raise ValueError(f"unknown controls {unknown}; controls are {list(CONTROLS)}")
    n = len(items)
    k = 1 + (seed % (n - 1)) if n > 1 else 0  # a rotation by k >= 1 moves every prompt to another image
    kinds = NOISE_KINDS
    make: dict[str, Callable[[], Iterable[ScoredItem]]] = {
        "shuffled_prompts": lambda: (
            (items[i][0], items[(i + k) % n][1], items[(i + k) % n][2]) for i in range(n)
        ),
        "recoloured": lambda: ((recolour(img), spec, prompt) for img, spec, prompt in items),
        "blank": lambda: ((blank_like(img), spec, prompt) for img, spec, prompt in items),
        "noise": lambda: (
            (noise_like(img, _control_rng(seed, "noise", i), kinds[i % len(kinds)]), spec, prompt)
            for i, (img, spec, prompt) in enumerate(items)
        ),
        "blobs": lambda: (
            (blobs_like(img, spec, _control_rng(seed, "blobs", i)), spec, prompt)
            for i, (img, spec, prompt) in enumerate(items)
        ),
    }
    return {name: score_images(make[name]()) for name in names}


def format_report(report: EvalReport, title: str = "") -> str:
    """A small human-readable table of a report."""

    def fmt(v: float | None) -> str:
        return "  n/a" if v is None else f"{v:.3f}"

    lines = [f"{title} ({report.n_images} images)" if title else f"{report.n_images} images"]
    lines.append(f"  overall   {fmt(report.overall)}")
    for name, v in report.categories.items():
        lines.append(f"  {name:<9} {fmt(v['acc'])}  (n={v['n']})")
    lines.append("  by scene kind:")
    for name, v in report.kinds.items():
        lines.append(f"    {name:<9} {fmt(v['acc'])}  (n={v['n']})")
    lines.append("  by object position in the prompt:")
    for name, v in report.by_position.items():
        lines.append(f"    {name:<9} {fmt(v['acc'])}  (n={v['n']})")
    lines.append("  relation scenes with both objects found:")
    for name, v in report.relation_direction.items():
        lines.append(f"    {name:<9} {fmt(v['acc'])}  (n={v['n']})")
    return "\n".join(lines)
