"""The compute stages of a cache build, applied to one unit of rows at a time (run as Ray tasks and actors by
`pipelines.execute`; kept in a module, not `__main__`, so workers import them cleanly).

A unit's rows travel as one Arrow table with the contract columns (null until computed) plus internal `_`
columns: `_pixels` (bucket-sized RGB uint8 HWC bytes, dropped after the VAE), `_reason`/`_detail`
(quarantine), `_grounding` (a build with layout: the row's grounding in its bucket crop, JSON; read by the
encoder stage), the contract's `negative_caption` (a build with negatives; null where the row has none) and
`_new_<group>` (True where this build computed the group; the summary counts them).
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from lidit.cache import contract as C
from lidit.cache.storage import open_location
from lidit.images import cover_crop
from lidit.layout import crop_grounding, parse_grounding
from pipelines.sources import read_unit_rows
from pipelines.tasks import BuildSpec, UnitTask

COL_PIXELS = "_pixels"
COL_REASON = "_reason"
COL_DETAIL = "_detail"
COL_GROUNDING = "_grounding"


def new_column(group: str) -> str:
    """Internal bool column: did this build compute `group` for the row."""
    return f"_new_{group}"


def group_columns(group: str, layout: bool = False, negatives: bool = False) -> list[tuple[str, pa.DataType]]:
    """Contract columns that make up a column group (`latents` or an encoder name; `layout` / `negatives`:
    encoder groups hold the layout targets / the negative captions' states too)."""
    if group == C.LATENT_GROUP:
        return [
            (C.COL_LATENT, pa.binary()),
            (C.COL_LATENT_HEIGHT, pa.int32()),
            (C.COL_LATENT_WIDTH, pa.int32()),
        ]
    out = [(C.states_column(group), pa.binary()), (C.length_column(group), pa.int32())]
    if layout:
        out.append((C.layout_column(group), pa.binary()))
    if negatives:
        out += [(C.negative_states_column(group), pa.binary()), (C.negative_length_column(group), pa.int32())]
    return out


def set_column(table: pa.Table, name: str, values: list[Any], dtype: pa.DataType) -> pa.Table:
    arr = pa.array(values, type=dtype)
    if name in table.schema.names:
        return table.set_column(table.schema.get_field_index(name), name, arr)
    return table.append_column(name, arr)


# ---- decode / validate / bucket ----


class Rejected(Exception):
    """A row goes to quarantine with `reason` (one of contract.QUARANTINE_REASONS)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail[:300]


def _negative_caption(value: Any) -> str | None:
    """A source's negative-caption value: a caption, or None for a row without one (null or blank)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise Rejected("bad_negative_caption", f"not a string: {type(value).__name__}")
    return value if value.strip() else None


def decode_image(value: Any, max_pixels: int, min_side: int) -> Image.Image:
    """Bytes -> validated RGB image, or `Rejected` with the reason."""
    if isinstance(value, dict) and "bytes" in value:  # Hugging Face datasets' Image feature layout
        value = value["bytes"]
    if value is None:
        raise Rejected("missing_image")
    if not isinstance(value, bytes | bytearray | memoryview):
        raise Rejected("wrong_type", f"image value is {type(value).__name__}, not bytes")
    if len(value) == 0:
        raise Rejected("empty_image", "zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(value))
        except Image.DecompressionBombError as exc:
            raise Rejected("too_large", str(exc)) from None
        except UnidentifiedImageError:
            raise Rejected("not_an_image", f"{len(value)} bytes, starts {bytes(value[:8])!r}") from None
        except Exception as exc:  # malformed headers raise all sorts of errors
            raise Rejected("undecodable", f"{type(exc).__name__}: {exc}") from None
        w, h = im.size
        if w * h > max_pixels:
            raise Rejected("too_large", f"{w}x{h} > max_image_pixels={max_pixels}")
        if min(w, h) < min_side:
            raise Rejected("too_small", f"{w}x{h} < min_image_side={min_side}")
        try:
            im.load()
        except Exception as exc:
            reason = "truncated" if "truncat" in str(exc).lower() else "undecodable"
            raise Rejected(reason, f"{type(exc).__name__}: {exc}") from None
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):  # flatten alpha on white rather than on undefined colour values
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").split()[-1])
        return bg
    return im.convert("RGB")


def choose_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (w, h) bucket whose aspect ratio is closest in log space."""
    r = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


def resize_to_bucket(im: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
    """Resize to cover the bucket, then centre-crop: (H, W, 3) uint8."""
    bw, bh = bucket
    rw, rh, left, top = cover_crop(im.width, im.height, bucket)
    if (rw, rh) != im.size:
        im = im.resize((rw, rh), Image.Resampling.BICUBIC)
    return np.asarray(im.crop((left, top, left + bw, top + bh)), dtype=np.uint8)


@lru_cache(maxsize=8)
def _token_counter(path: str) -> Callable[[list[str]], list[int]]:
    """Prompt token counts as PromptEncoder tokenizes (no special tokens). Uses the `tokenizers` file when
    there is one: importing transformers costs decode workers more than decoding itself on small boxes."""
    file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(file):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(file)
        # A saved tokenizer.json may carry truncation (the starter's has max_length 63): count every token.
        tok.no_truncation()
        tok.no_padding()
        return lambda texts: [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(path)
    return lambda texts: [len(x) for x in auto(texts, add_special_tokens=False)["input_ids"]]


def prepare_unit(spec: BuildSpec, task: UnitTask) -> pa.Table:
    """Read a unit's rows from its source, validate, bucket-resize, and pull reusable columns.

    Output: one row per source row of the unit, contract columns (null until computed) + internal columns.
    """
    loc = open_location(task.source_uri, spec.storage_options)
    start, stop = task.start, task.stop
    n = stop - start
    ids, images, captions, flaws, groundings, negative_captions = read_unit_rows(loc, task)
    dup = set(task.dup)
    img_cfg = spec.image
    buckets = [tuple(b) for b in img_cfg.buckets]
    groups = list(spec.groups)
    reuse_groups = set(task.reuse_groups)

    # reusable columns from the unit's previous shard, looked up by id
    old: dict[str, dict[str, Any]] = {}
    if task.reuse_path:
        out_loc = open_location(spec.output_uri, spec.storage_options)
        cols = [C.COL_ID] + [
            c for g in reuse_groups for c, _ in group_columns(g, spec.layout, spec.negatives)
        ]
        with out_loc.fs.open(task.reuse_path, "rb") as f:
            prev = pq.read_table(f, columns=cols).to_pylist()
        old = {r[C.COL_ID]: r for r in prev}

    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            C.COL_ID, C.COL_CAPTION, C.COL_SOURCE_ROW, C.COL_WIDTH, C.COL_HEIGHT, C.COL_BUCKET,
            C.COL_BUCKET_WIDTH, C.COL_BUCKET_HEIGHT, COL_PIXELS, COL_REASON, COL_DETAIL, COL_GROUNDING,
            C.COL_NEGATIVE_CAPTION,
        )
    }  # fmt: skip
    group_vals: dict[str, dict[str, list[Any]]] = {
        g: {c: [] for c, _ in group_columns(g, spec.layout, spec.negatives)} for g in groups
    }
    for i in range(n):
        rid, caption = ids[i], captions[i]
        row: dict[str, Any] = dict.fromkeys(cols)
        row.update({C.COL_ID: rid, C.COL_CAPTION: caption, C.COL_SOURCE_ROW: start + i})
        try:
            if rid is None or rid == "":
                raise Rejected("missing_id")
            if i in dup:
                raise Rejected("duplicate_id", f"id {rid!r} seen earlier")
            if i in flaws:  # the source says what is wrong (a tar member cut short)
                raise Rejected(*flaws[i])
            if not isinstance(caption, str) or not caption.strip():
                raise Rejected("empty_caption")
            im = decode_image(images[i], img_cfg.max_image_pixels, img_cfg.min_image_side)
            bw, bh = choose_bucket(im.width, im.height, buckets)
            if spec.layout:
                try:
                    grounding = parse_grounding(groundings[i] if groundings else None, caption)
                except ValueError as exc:
                    raise Rejected("bad_grounding", str(exc)) from None
                row[COL_GROUNDING] = json.dumps(crop_grounding(grounding, im.width, im.height, (bw, bh)))
            if spec.negatives and negative_captions:
                row[C.COL_NEGATIVE_CAPTION] = _negative_caption(negative_captions[i])
            row.update(
                {C.COL_WIDTH: im.width, C.COL_HEIGHT: im.height, C.COL_BUCKET: f"{bw}x{bh}"}
                | {C.COL_BUCKET_WIDTH: bw, C.COL_BUCKET_HEIGHT: bh}
            )
            prev_row = old.get(rid)
            if C.LATENT_GROUP not in reuse_groups or prev_row is None:
                row[COL_PIXELS] = resize_to_bucket(im, (bw, bh)).tobytes()
        except Rejected as rej:
            row[COL_REASON], row[COL_DETAIL] = rej.reason, rej.detail
            prev_row = None
        for k in cols:
            cols[k].append(row[k])
        for g in groups:
            take = prev_row is not None and g in reuse_groups
            for c in group_vals[g]:
                group_vals[g][c].append(prev_row[c] if take else None)

    # over-long captions: tokenized exactly as PromptEncoder does (no special tokens, prefix not counted)
    for column, reason, what in (
        (C.COL_CAPTION, "caption_too_long", ""),
        (C.COL_NEGATIVE_CAPTION, "bad_negative_caption", "negative caption: "),
    ):
        for enc in spec.encoders:
            valid = [i for i in range(n) if cols[COL_REASON][i] is None and cols[column][i] is not None]
            if not valid:
                break
            lengths = _token_counter(enc.path)([cols[column][i] for i in valid])
            for i, length in zip(valid, lengths, strict=True):
                if length > enc.max_length:
                    cols[COL_REASON][i] = reason
                    cols[COL_DETAIL][i] = f"{what}{length} tokens > max_length={enc.max_length} of {enc.name}"
                    cols[COL_PIXELS][i] = None
                    for g in groups:
                        for c in group_vals[g]:
                            group_vals[g][c][i] = None

    types = {
        C.COL_ID: pa.string(), C.COL_CAPTION: pa.string(), C.COL_SOURCE_ROW: pa.int64(), C.COL_WIDTH: pa.int32(),
        C.COL_HEIGHT: pa.int32(), C.COL_BUCKET: pa.string(), C.COL_BUCKET_WIDTH: pa.int32(),
        C.COL_BUCKET_HEIGHT: pa.int32(), COL_PIXELS: pa.binary(), COL_REASON: pa.string(), COL_DETAIL: pa.string(),
        COL_GROUNDING: pa.string(), C.COL_NEGATIVE_CAPTION: pa.string(),
    }  # fmt: skip
    arrays = {k: pa.array(v, type=types[k]) for k, v in cols.items()}
    arrays[C.COL_SOURCE] = pa.array([task.source_uri] * n, type=pa.string())
    for g in groups:
        for c, t in group_columns(g, spec.layout, spec.negatives):
            arrays[c] = pa.array(group_vals[g][c], type=t)
        arrays[new_column(g)] = pa.array([False] * n, type=pa.bool_())
    return pa.table(arrays)


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


class _BatchedStage:
    """A model stage: `run` takes a whole unit and feeds the model `batch_size` rows at a time."""

    batch_size: int

    def run(self, table: pa.Table) -> pa.Table:
        parts = [self(table.slice(i, self.batch_size)) for i in range(0, table.num_rows, self.batch_size)]
        return pa.concat_tables(parts) if parts else self(table)

    def __call__(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError


class VaeStage(_BatchedStage):
    """Actor: bucket-sized pixels -> scaled VAE latent means, batched per bucket."""

    def __init__(self, vae_path: str, dtype: str, device: str, threads: int | None, batch_size: int) -> None:
        import torch
        from diffusers import AutoencoderKL

        _set_threads(threads)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae = AutoencoderKL.from_pretrained(vae_path).to(self.device).eval().requires_grad_(False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from lidit.pipeline import vae_to_latents

        reasons = batch.column(COL_REASON).to_pylist()
        pixels = batch.column(COL_PIXELS).to_pylist()
        todo = [i for i in range(batch.num_rows) if reasons[i] is None and pixels[i] is not None]
        if todo:
            latent = batch.column(C.COL_LATENT).to_pylist()
            lh = batch.column(C.COL_LATENT_HEIGHT).to_pylist()
            lw = batch.column(C.COL_LATENT_WIDTH).to_pylist()
            new = batch.column(new_column(C.LATENT_GROUP)).to_pylist()
            bws = batch.column(C.COL_BUCKET_WIDTH).to_pylist()
            bhs = batch.column(C.COL_BUCKET_HEIGHT).to_pylist()
            by_bucket: dict[tuple[int, int], list[int]] = {}
            for i in todo:
                by_bucket.setdefault((bws[i], bhs[i]), []).append(i)
            for (bw, bh), rows in by_bucket.items():
                arr = np.stack([np.frombuffer(pixels[i], np.uint8).reshape(bh, bw, 3) for i in rows])
                x = torch.from_numpy(arr).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                with torch.no_grad():
                    z = vae_to_latents(self.vae.encode(x).latent_dist.mean, self.vae)  # (B, C, h, w)
                for j, i in enumerate(rows):
                    latent[i] = C.encode_tensor(z[j], self.dtype)
                    lh[i], lw[i], new[i] = z.shape[2], z.shape[3], True
            batch = set_column(batch, C.COL_LATENT, latent, pa.binary())
            batch = set_column(batch, C.COL_LATENT_HEIGHT, lh, pa.int32())
            batch = set_column(batch, C.COL_LATENT_WIDTH, lw, pa.int32())
            batch = set_column(batch, new_column(C.LATENT_GROUP), new, pa.bool_())
        return batch.drop_columns([COL_PIXELS])


class EncoderStage(_BatchedStage):
    """Actor: captions -> one encoder's prompt-token states (prefix shared, no padding stored), with `layout`
    each token's layout target from the row's grounding (`lidit.layout.grounding_targets`), and with
    `negatives` the states of the row's negative caption (empty, length 0, for a row without one)."""

    def __init__(
        self,
        encoder_config: dict[str, Any],
        dtype: str,
        fingerprint: str,
        prefix: tuple[str, dict, str],
        device: str,
        threads: int | None,
        batch_size: int,
        layout: bool = False,
        negatives: bool = False,
    ) -> None:
        from lidit.encoder import EncoderConfig, PromptEncoder
        from pipelines.prefix import write_prefix

        _set_threads(threads)
        self.batch_size = batch_size
        self.encoder = PromptEncoder(EncoderConfig.model_validate(encoder_config), device=device)
        self.dtype = dtype
        self.layout = layout
        self.negatives = negatives
        if self.encoder.fingerprint != fingerprint:
            raise RuntimeError(
                f"encoder {self.encoder.name}: model files changed since planning "
                f"(fingerprint {self.encoder.fingerprint}, planned {fingerprint}); rerun the build"
            )
        # Before any row: a shard with this encoder's states always has its prefix file (contract).
        write_prefix(*prefix, self.encoder, dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        name = self.encoder.name
        s_col, l_col = C.states_column(name), C.length_column(name)
        reasons = batch.column(COL_REASON).to_pylist()
        states = batch.column(s_col).to_pylist()
        todo = [i for i in range(batch.num_rows) if reasons[i] is None and states[i] is None]
        if not todo:
            return batch
        lengths = batch.column(l_col).to_pylist()
        new = batch.column(new_column(name)).to_pylist()
        captions = batch.column(C.COL_CAPTION).to_pylist()
        # Safety net: the decode stage's token count should have caught these; quarantine, never crash.
        counts = self.encoder.token_lengths([captions[i] for i in todo])
        too_long = [i for i, n in zip(todo, counts, strict=True) if n > self.encoder.config.max_length]
        if too_long:
            details = batch.column(COL_DETAIL).to_pylist()
            for i in too_long:
                reasons[i], details[i] = "caption_too_long", f"more than max_length tokens for {name}"
            batch = set_column(batch, COL_REASON, reasons, pa.string())
            batch = set_column(batch, COL_DETAIL, details, pa.string())
            todo = [i for i in todo if i not in set(too_long)]
            if not todo:
                return batch
        enc = self.encoder.encode_prompts([captions[i] for i in todo])
        for i, x in zip(todo, enc.unpadded(), strict=True):
            states[i] = C.encode_tensor(x, self.dtype)
            lengths[i], new[i] = x.shape[0], True
        if self.layout:
            batch = self._add_layout(batch, todo, captions, lengths)
        if self.negatives:
            batch = self._add_negatives(batch, todo)
        batch = set_column(batch, s_col, states, pa.binary())
        batch = set_column(batch, l_col, lengths, pa.int32())
        return set_column(batch, new_column(name), new, pa.bool_())

    def _add_negatives(self, batch: pa.Table, todo: list[int]) -> pa.Table:
        name = self.encoder.name
        s_col, l_col = C.negative_states_column(name), C.negative_length_column(name)
        states, lengths = batch.column(s_col).to_pylist(), batch.column(l_col).to_pylist()
        negatives = batch.column(C.COL_NEGATIVE_CAPTION).to_pylist()
        for i in todo:
            states[i], lengths[i] = b"", 0
        have = [i for i in todo if negatives[i] is not None]
        if have:
            enc = self.encoder.encode_prompts([negatives[i] for i in have])
            for i, x in zip(have, enc.unpadded(), strict=True):
                states[i], lengths[i] = C.encode_tensor(x, self.dtype), x.shape[0]
        batch = set_column(batch, s_col, states, pa.binary())
        return set_column(batch, l_col, lengths, pa.int32())

    def _add_layout(
        self, batch: pa.Table, todo: list[int], captions: list[str], lengths: list[int]
    ) -> pa.Table:
        from lidit.layout import grounding_targets

        col = C.layout_column(self.encoder.name)
        layouts = batch.column(col).to_pylist()
        groundings = batch.column(COL_GROUNDING).to_pylist()
        spans = self.encoder.token_spans([captions[i] for i in todo])
        for i, token_spans in zip(todo, spans, strict=True):
            targets = grounding_targets(json.loads(groundings[i]), token_spans)
            if len(targets) != lengths[i]:
                raise RuntimeError(
                    f"internal error: {len(targets)} layout targets for {lengths[i]} prompt states"
                )
            layouts[i] = C.encode_tensor(targets, C.LAYOUT_DTYPE)
        return set_column(batch, col, layouts, pa.binary())
