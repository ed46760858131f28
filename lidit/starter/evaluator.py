"""A deterministic GenEval-style scorer for coloured-shape images against their prompt specs.

Detection is classical image processing, no model: every pixel is classified by its colour *direction* from the
background (an antialiased or faded pixel keeps its colour's direction), kept when it is at least half-way from
the background to that colour, and grouped into 8-connected blobs per colour; each blob's shape is the best IoU
among the four shape templates drawn into its bounding box.

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
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lidit.starter.captions import locate_mentions, position_bin
from lidit.starter.render import draw_shape
from lidit.starter.scenes import BACKGROUND, COLOURS, SHAPES, relation_holds

CATEGORIES: tuple[str, ...] = ("colour", "shape", "binding", "count", "position")
POSITION_BINS: tuple[str, ...] = ("first", "middle", "last")
SPECS_FILE = "specs.jsonl"

_COLOUR_NAMES = list(COLOURS)
_BG = np.asarray(BACKGROUND, dtype=np.float32) / 255.0
_DIRS = np.stack([np.asarray(COLOURS[c], dtype=np.float32) / 255.0 - _BG for c in _COLOUR_NAMES])  # (K, 3)
_NORMS = np.linalg.norm(_DIRS, axis=1)  # (K,)
_UNIT = _DIRS / _NORMS[:, None]

MIN_ALPHA = 0.5  # fraction of the way from background to the colour for a pixel to count as the object
MIN_COS = 0.9  # cosine to the nearest palette direction; greys and whites are not palette colours
MIN_IOU = 0.5  # best shape template IoU below this: shape "unknown"
MIN_AREA_FRAC = 12 / (64 * 64)  # blobs smaller than this fraction of the image are noise
RELATION_MARGIN_FRAC = 2 / 64  # centres must differ by this fraction of the width along the relation axis


@dataclass(frozen=True)
class Detection:
    """One detected blob."""

    colour: str
    shape: str
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    center: tuple[float, float]  # centroid x, y
    iou: float  # IoU with the chosen shape template


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


@dataclass
class EvalReport:
    """Aggregate accuracies over a set of scored images."""

    n_images: int
    overall: float | None  # None for an empty set
    categories: dict[str, dict[str, float]]  # name -> {"acc", "n"}
    kinds: dict[str, dict[str, float]]  # scene kind -> {"acc", "n"} (overall accuracy)
    by_position: dict[str, dict[str, float]]  # first/middle/last -> {"acc", "n"} (objects)

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
    """8-connected components of equal non-negative labels; returns component ids (-1 for background)."""
    h, w = labels.shape
    fg = labels >= 0
    big = h * w + 1
    comp = np.where(fg, np.arange(h * w, dtype=np.int64).reshape(h, w), big)
    padded_lab = np.pad(labels, 1, constant_values=-1)
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    same = [padded_lab[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] == labels for dy, dx in shifts]
    # Min-label propagation to a fixed point: a few dozen vectorised passes for 64x64 blobs.
    while True:
        padded = np.pad(comp, 1, constant_values=big)
        new = comp
        for (dy, dx), ok in zip(shifts, same, strict=True):
            nb = padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            new = np.where(ok & fg, np.minimum(new, nb), new)
        if np.array_equal(new, comp):
            break
        comp = new
    return np.where(fg, comp, -1)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    h, w = mask.shape
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def _shape_side(shape: str, area: float) -> float:
    """Side of the bounding square of `shape` with the given area."""
    factor = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}[shape]
    return float(np.sqrt(area / factor))


def _soft_template(shape: str, side: float, center: tuple[float, float], w: int, h: int) -> np.ndarray:
    scale = 4
    cx, cy = center
    # Templates are placed by centroid; a triangle's centroid sits 2/3 of the way down from its apex.
    y0 = cy - (2 * side / 3 if shape == "triangle" else side / 2)
    x0 = cx - side / 2
    canvas = Image.new("L", (w * scale, h * scale), 0)
    box = (x0 * scale, y0 * scale, (x0 + side) * scale, (y0 + side) * scale)
    draw_shape(ImageDraw.Draw(canvas), shape, box, 255)
    return np.asarray(canvas.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0


def classify_shape(soft: np.ndarray) -> tuple[str, float]:
    """Best shape for a blob given as soft coverage (0..1) in a window around it, with its soft IoU.

    Each template has the blob's mass (sum of coverage) and is centred on the blob's centroid: both survive
    blur and antialiasing, unlike a bounding box (blur eats a diamond's tips and makes its box look round).
    """
    h, w = soft.shape
    mass = float(soft.sum())
    if mass <= 0:
        return "unknown", 0.0
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    center = (float((xs * soft).sum() / mass), float((ys * soft).sum() / mass))
    best, best_iou = "unknown", 0.0
    for shape in SHAPES:
        tpl = _soft_template(shape, _shape_side(shape, mass), center, w, h)
        union = float(np.maximum(soft, tpl).sum())
        iou = float(np.minimum(soft, tpl).sum()) / union if union else 0.0
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= MIN_IOU else "unknown"), best_iou


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
    pad = 2  # soft edges of a blob reach about this far past its half-coverage outline
    out: list[Detection] = []
    ids, counts = np.unique(comp[comp >= 0], return_counts=True)
    for cid, area in zip(ids.tolist(), counts.tolist(), strict=True):
        if area < min_area:
            continue
        ys, xs = np.nonzero(comp == cid)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        colour_idx = int(labels[ys[0], xs[0]])
        wx0, wy0, wx1, wy1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
        region = comp[wy0:wy1, wx0:wx1]
        near = _dilate(region == cid, pad) & ((region == cid) | (region < 0))
        soft = np.where(near & (k[wy0:wy1, wx0:wx1] == colour_idx), alpha[wy0:wy1, wx0:wx1], 0.0)
        shape, iou = classify_shape(soft)
        mass = float(soft.sum())
        gy, gx = np.mgrid[wy0:wy1, wx0:wx1]
        center = (float(((gx + 0.5) * soft).sum() / mass), float(((gy + 0.5) * soft).sum() / mass))
        out.append(
            Detection(_COLOUR_NAMES[colour_idx], shape, int(area), (x0, y0, x1, y1), center, round(iou, 4))
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
    if rel:
        a, b = matches[rel["subject"]], matches[rel["object"]]
        position_ok = bool(a and b) and relation_holds(
            a[0].center, b[0].center, rel["relation"], margin=RELATION_MARGIN_FRAC * width
        )
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


def control_reports(
    items: list[tuple[Image.Image | np.ndarray, dict[str, Any], str | None]], seed: int = 0
) -> dict[str, EvalReport]:
    """Scores of deliberately wrong pairs built from real `(image, spec, prompt)` items: each image with another
    image's prompt (`shuffled_prompts`), recoloured images (`recoloured`) and blank images (`blank`)."""
    n = len(items)
    k = 1 + (seed % (n - 1)) if n > 1 else 0  # a rotation by k >= 1 moves every prompt to another image
    return {
        "shuffled_prompts": score_images(
            (items[i][0], items[(i + k) % n][1], items[(i + k) % n][2]) for i in range(n)
        ),
        "recoloured": score_images((recolour(img), spec, prompt) for img, spec, prompt in items),
        "blank": score_images((blank_like(img), spec, prompt) for img, spec, prompt in items),
    }


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
    return "\n".join(lines)
