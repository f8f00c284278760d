"""The HTML report QA reads: images drawn for humans, one card per case, written atomically.

Two halves. The drawing half (``feature_grid``, ``colorize``, ``overlay``, ``colorbar``, ``draw_regions``,
``render_case_assets``) turns arrays into screen-sized image files; pytest-xdist workers call it and write
straight into the run's asset folder, so the controller never ships pixels between processes. The page
half (``write_report``) runs once, on the controller, and only reads those files (sizes for the layout,
bytes for the self-contained page).

The page is rendered by jinja2 with autoescape on: case ids, labels, file names and messages come from
specs and models and are never trusted. No torch here (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import functools
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
import unicodedata
from pathlib import Path
from urllib.parse import quote
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image

from audit.errors import AuditError, UnknownNameError, closest
from audit.files import atomic_write_bytes, create_temp

if TYPE_CHECKING:
    import jinja2

__all__ = ["feature_grid", "colorize", "overlay", "colorbar", "draw_regions", "outlines_from_mask",
           "safe_stem", "ReportWriter", "check_writable", "new_run_dir", "render_case_assets", "warm_up",
           "write_report", "SCHEMA_VERSION", "RUN_ID_PATTERN"]

SCHEMA_VERSION = 1
#: run ids look like ``20240131-235959-1a2b3c``; only folders matching this are ever deleted by us.
RUN_ID_PATTERN = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")

COLORMAPS = {"jet": cv2.COLORMAP_JET, "viridis": cv2.COLORMAP_VIRIDIS, "turbo": cv2.COLORMAP_TURBO,
             "inferno": cv2.COLORMAP_INFERNO, "magma": cv2.COLORMAP_MAGMA}

GREEN = (0, 220, 0)
RED = (255, 40, 40)
SEEN = (255, 200, 0)

DISPLAY_MAX = 1024   # long side of full-size images in the report
DISPLAY_MIN = 256    # the page shows small images (64x64 scenes) at least this large, pixelated
DRAW_MIN = 128       # ... and their outlines are drawn at >= this size (half the pixels to draw and encode)
GRID_MIN_TILE = 48   # feature maps smaller than this are upscaled (nearest) so the tiles are visible
JPEG_QUALITY = 85
LABEL_SCALES = (0.8, 0.6)   # channel labels on tiles of >= 64 px and on smaller ones


# --------------------------------------------------------------------------------------------------
# drawing


def grid_columns(n: int) -> int:
    """Columns of the classic notebook layout: 6 rows up to 96 maps (64 → 11, 72 → 12), square beyond."""
    if n <= 0:
        return 1
    return math.ceil(n / 6) if n <= 96 else math.ceil(math.sqrt(n))


def feature_grid(maps: np.ndarray, max_channels: int | None = None, columns: int | None = None,
                 label: bool = True, upscale: int = 1, separator: int = 255) -> np.ndarray:
    """One grey image of the first ``max_channels`` feature maps, each stretched to its own min..max.

    Per-channel normalisation is what makes dead or weak channels visible at all; a constant channel is
    black (not NaN). Built by reshaping one padded array so 512 channels cost the same as 8 plots would.
    ``upscale`` repeats pixels (nearest) for tiny maps; separators are 1 px of ``separator`` grey.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"feature_grid wants (C, h, w) maps, got shape {maps.shape}")
    n = maps.shape[0] if max_channels is None else max(0, min(int(max_channels), maps.shape[0]))
    up = max(1, int(upscale))
    h, w = maps.shape[1] * up, maps.shape[2] * up
    cols = max(1, int(columns)) if columns else grid_columns(n)
    rows = max(1, math.ceil(n / cols))
    if n == 0:
        return np.full((max(1, h), max(1, w)), separator, dtype=np.uint8)

    x = maps[:n].astype(np.float32, copy=False)
    lo, hi = _extremes(x)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):   # NaN and inf show up in the extremes
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = _extremes(x)
    # the scale in float64: a channel spanning +-3e38 or a subnormal span must not overflow to inf/NaN
    span = hi.astype(np.float64) - lo
    if span.min() > 1e-30 and span.max() < 1e38:   # the usual case: float32 all the way, no overflow
        norm = x - lo[:, None, None]
        norm *= (255.0 / span).astype(np.float32)[:, None, None]
    else:
        with np.errstate(divide="ignore", over="ignore"):
            scale = np.divide(255.0, span, out=np.zeros_like(span), where=span > 0)
        scale[~np.isfinite(scale)] = 0.0
        norm = (x - lo.astype(np.float64)[:, None, None]) * scale[:, None, None]
    np.clip(norm, 0, 255, out=norm)
    norm += 0.5
    pixels = norm.astype(np.uint8)
    if up > 1:   # tiny maps are repeated after the 8-bit conversion: up^2 fewer float operations
        pixels = pixels.repeat(up, axis=1).repeat(up, axis=2)

    if label and min(h, w) >= 16:
        stamps, inked = _label_sheet(n, h, w)   # channel index top left, white on a black box
        np.copyto(pixels[:, :stamps.shape[1], :stamps.shape[2]], stamps, where=inked)
    # tiles of (h+1) x (w+1) with the separator as their last row and column, cut off at the grid's edges;
    # written through a view, so the grid is the only picture-sized array made here
    padded = np.full((rows * (h + 1), cols * (w + 1)), separator, dtype=np.uint8)
    cells = padded.reshape(rows, h + 1, cols, w + 1).transpose(0, 2, 1, 3)
    full_rows, rest = divmod(n, cols)
    cells[:full_rows, :, :h, :w] = pixels[:full_rows * cols].reshape(full_rows, cols, h, w)
    if rest:
        cells[full_rows, :rest, :h, :w] = pixels[full_rows * cols:]
    return padded[:-1, :-1]


def _extremes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = x.reshape(x.shape[0], -1)
    return flat.min(axis=1), flat.max(axis=1)


@functools.lru_cache(maxsize=64)
def _label_sheet(n: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The labels of ``n`` tiles of ``h`` x ``w`` as one block and where it covers them: one copy per grid.

    A label is its channel's index, white on a black box, cut at the tile's edge (3 digits on 16 px).
    """
    scale = LABEL_SCALES[0] if min(h, w) >= 64 else LABEL_SCALES[1]
    stamps = [_label_stamp(i, scale)[:h, :w] for i in range(n)]
    height, width = max(s.shape[0] for s in stamps), max(s.shape[1] for s in stamps)
    sheet = np.zeros((n, height, width), dtype=np.uint8)
    inked = np.zeros((n, height, width), dtype=bool)
    for i, stamp in enumerate(stamps):
        sheet[i, :stamp.shape[0], :stamp.shape[1]] = stamp
        inked[i, :stamp.shape[0], :stamp.shape[1]] = True
    sheet.setflags(write=False)
    inked.setflags(write=False)
    return sheet, inked


@functools.lru_cache(maxsize=4096)
def _label_stamp(index: int, scale: float) -> np.ndarray:
    """The label of one channel, drawn once per index: a 512-channel grid should not call OpenCV 512 times."""
    font, thick, text = cv2.FONT_HERSHEY_PLAIN, 1, str(index)
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    stamp = np.zeros((th + base + 2, tw + 3), dtype=np.uint8)
    cv2.putText(stamp, text, (1, th + 1), font, scale, 255, thick, cv2.LINE_AA)
    stamp.setflags(write=False)
    return stamp


def _colormap_code(colormap: str) -> int:
    try:
        return COLORMAPS[colormap.lower()]
    except (KeyError, AttributeError):
        raise UnknownNameError("colormap", colormap, closest(str(colormap), COLORMAPS)) from None


@functools.lru_cache(maxsize=None)
def _colormap_lut(colormap: str) -> np.ndarray:
    """OpenCV's 256-entry colormap as an RGB table, built once: ``applyColorMap`` rebuilds it per call."""
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    lut = cv2.cvtColor(cv2.applyColorMap(ramp, _colormap_code(colormap)), cv2.COLOR_BGR2RGB).reshape(256, 3)
    lut.setflags(write=False)
    return lut


def colorize(heat: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """An RGB uint8 picture of a [0, 1] heatmap (values outside are clipped, NaN counts as 0)."""
    lut = _colormap_lut(str(colormap).lower())
    heat = np.asarray(heat, dtype=np.float32)
    if not np.isfinite(heat).all():   # the engine never gives NaN; a hand-made heatmap might
        heat = np.nan_to_num(heat, nan=0.0, posinf=1.0, neginf=0.0)
    u8 = (np.clip(heat, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if u8.ndim == 2:   # the table as OpenCV's "user colormap": 8x numpy's gather on 64x64, 25x on a photo
        return cv2.applyColorMap(u8, lut.reshape(256, 1, 3))
    return lut[u8]


def _resize_heat(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    heat = np.asarray(heat, dtype=np.float32)
    if (heat.shape[1], heat.shape[0]) == tuple(size):
        return heat
    return cv2.resize(heat, size, interpolation=cv2.INTER_LINEAR)


def overlay(image: Image.Image, heat: np.ndarray, colormap: str = "jet", alpha: float = 0.4) -> Image.Image:
    """The classic notebook's ``heatmap * 0.4 + img``, saturated at 255 (the heat is resized to the image)."""
    return Image.fromarray(_blend(_rgb(image), colorize(_resize_heat(heat, image.size), colormap), alpha), "RGB")


def _blend(rgb: np.ndarray, colour: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """``colour * alpha + rgb`` rounded and saturated, both RGB uint8 of one size.

    ``cv2.addWeighted`` gives exactly ``clip(rint(float32(colour) * 0.4 + rgb))`` (checked for all 65536
    pairs in the tests) in a quarter of numpy's time.
    """
    return cv2.addWeighted(colour, alpha, rgb, 1.0, 0.0)


def _rgb(image: Image.Image) -> np.ndarray:
    """An RGB uint8 array of any PIL image (read-only: it shares nothing with the image, but numpy says so)."""
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def colorbar(colormap: str = "jet", height: int = 256, width: int = 44) -> np.ndarray:
    """A vertical colour bar (1 at the top, 0 at the bottom) with both ticks labelled, RGB uint8."""
    height = max(int(height), 40)
    pad = 8
    bar_w = 14
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    ramp = np.linspace(1.0, 0.0, height - 2 * pad, dtype=np.float32)[:, None].repeat(bar_w, axis=1)
    img[pad:height - pad, 2:2 + bar_w] = colorize(ramp, colormap)
    cv2.rectangle(img, (1, pad - 1), (2 + bar_w, height - pad), (80, 80, 80), 1)
    font = cv2.FONT_HERSHEY_PLAIN
    for text, y in (("1", pad), ("0", height - pad - 1)):
        cv2.line(img, (2 + bar_w, y), (6 + bar_w, y), (0, 0, 0), 1)
        (_, th), _ = cv2.getTextSize(text, font, 0.9, 1)
        cv2.putText(img, text, (9 + bar_w, min(height - 2, max(th + 1, y + th // 2))), font, 0.9,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return img


def outlines_from_mask(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Outer contours of a boolean mask as point lists, for ``draw_regions`` (mask and polygon regions)."""
    contours, _ = cv2.findContours(np.asarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [[(int(p[0][0]), int(p[0][1])) for p in c] for c in contours if len(c) >= 1]


def _points(outline: Sequence[Sequence[float]], scale: float) -> np.ndarray:
    return np.array([[round(float(x) * scale), round(float(y) * scale)] for x, y in outline], dtype=np.int32)


def _dashed(img: np.ndarray, pts: np.ndarray, colour, thickness: int, dash: int) -> None:
    closed = np.vstack([pts, pts[:1]]).astype(np.float64)
    for (x0, y0), (x1, y1) in zip(closed[:-1], closed[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        steps = max(1, int(length // dash))
        for k in range(0, steps, 2):
            a, b = k / steps, min(1.0, (k + 1) / steps)
            p = (int(round(x0 + (x1 - x0) * a)), int(round(y0 + (y1 - y0) * a)))
            q = (int(round(x0 + (x1 - x0) * b)), int(round(y0 + (y1 - y0) * b)))
            cv2.line(img, p, q, colour, thickness, cv2.LINE_AA)


def draw_regions(image: Image.Image, region_outlines: Iterable[Sequence[Sequence[float]]] | None,
                 avoid_outlines: Iterable[Sequence[Sequence[float]]] | None,
                 seen_box: Sequence[float] | None, scale: float = 1.0) -> Image.Image:
    """The image as QA needs it: expected regions solid green, avoid regions dashed red, unseen part greyed.

    Coordinates are in original-image pixels; ``scale`` maps them onto ``image`` when it was resized
    for display. Greying out what a centre crop cut off explains a heatmap that stops at an edge.
    """
    img = np.array(_rgb(image))
    return Image.fromarray(_draw_regions(img, region_outlines, avoid_outlines, seen_box, scale), "RGB")


def _draw_regions(img: np.ndarray, region_outlines: Iterable[Sequence[Sequence[float]]] | None,
                  avoid_outlines: Iterable[Sequence[Sequence[float]]] | None,
                  seen_box: Sequence[float] | None, scale: float) -> np.ndarray:
    """``draw_regions`` on a writable RGB array, in place (the report draws on arrays, not PIL images)."""
    h, w = img.shape[:2]
    thick = 1 if max(w, h) <= DRAW_MIN else max(2, round(max(w, h) / 300))   # a small one is shown enlarged
    if seen_box is not None:
        x0, y0, x1, y1 = (float(v) * scale for v in seen_box)
        x0, y0 = max(0, math.floor(x0 + 0.5)), max(0, math.floor(y0 + 0.5))
        x1, y1 = min(w, math.floor(x1 + 0.5)), min(h, math.floor(y1 + 0.5))
        if (x0 > 0 or y0 > 0 or x1 < w or y1 < h) and x1 > x0 and y1 > y0:
            outside = np.ones((h, w), dtype=bool)
            outside[y0:y1, x0:x1] = False
            img[outside] = (img[outside].astype(np.float32) * 0.3 + 140 * 0.7).astype(np.uint8)
            cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), SEEN, max(1, thick - 1), cv2.LINE_AA)
            _seen_label(img, (x0, y0, x1, y1))
    for outline in avoid_outlines or ():
        pts = _points(outline, scale)
        if len(pts):
            _dashed(img, pts, RED, thick, dash=max(6, 4 * thick))
    for outline in region_outlines or ():
        pts = _points(outline, scale)
        if len(pts):
            cv2.polylines(img, [pts], True, GREEN, thick, cv2.LINE_AA)
    return img


def _seen_label(img: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """'not seen by the model' in the widest greyed band, or on a dark strip at the top if none fits."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = box
    text, font = "not seen by the model", cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.35, min(0.6, w / 900))
    (tw, th), base = cv2.getTextSize(text, font, scale, 1)
    bands = [(y0, (4, y0 // 2 + th // 2)), (h - y1, (4, y1 + (h - y1) // 2 + th // 2)),
             (x0, (2, h // 2)), (w - x1, (x1 + 2, h // 2))]
    for i, (space, org) in enumerate(bands):
        fits = space >= th + base + 4 if i < 2 else space >= tw + 4
        if fits:
            cv2.putText(img, text, org, font, scale, (30, 30, 30), 1, cv2.LINE_AA)
            return
    img[0:th + base + 6, 0:tw + 8] = (30, 30, 30)
    cv2.putText(img, text, (4, th + 3), font, scale, SEEN, 1, cv2.LINE_AA)


# --------------------------------------------------------------------------------------------------
# case assets (workers)


def safe_stem(text: str, max_len: int = 40) -> str:
    """A file-name-safe, collision-free stem for any case id (unicode, HTML, slashes): ascii + short hash."""
    ascii_ = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_).strip("-.")[:max_len].strip("-.")
    digest = hashlib.sha1(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{clean}-{digest}" if clean else digest


def _display_factor(size: tuple[int, int], minimum: int = DISPLAY_MIN) -> float:
    long_side = max(size)
    if long_side > DISPLAY_MAX:
        return DISPLAY_MAX / long_side
    if long_side < minimum:
        return float(math.ceil(minimum / long_side))
    return 1.0


def _shown_size(size: Sequence[int]) -> tuple[int, int]:
    """The size the page gives a picture: small ones are enlarged by a whole factor (CSS pixelated)."""
    width, height = size
    if max(width, height) < DISPLAY_MIN:
        k = math.ceil(DISPLAY_MIN / max(width, height))
        return width * k, height * k
    return width, height


def _for_display(rgb: np.ndarray, factor: float) -> np.ndarray:
    """The picture at ``factor``: whole-number upscales repeat pixels (tiny scenes stay crisp), photos are
    downscaled with PIL's Lanczos filter. Always a new, writable array (regions are drawn on it)."""
    if factor == 1.0:
        return rgb.copy()
    if factor > 1:   # _display_factor enlarges by whole factors only: OpenCV's nearest repeats each pixel
        k = int(factor)
        return cv2.resize(rgb, (rgb.shape[1] * k, rgb.shape[0] * k), interpolation=cv2.INTER_NEAREST)
    height, width = rgb.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.array(Image.fromarray(rgb, "RGB").resize(size, Image.Resampling.LANCZOS))


def _thumb(pixels: np.ndarray, thumb_size: int) -> np.ndarray:
    if max(pixels.shape[:2]) <= thumb_size:
        return pixels
    t = Image.fromarray(pixels)
    t.thumbnail((thumb_size, thumb_size), Image.Resampling.LANCZOS)
    return np.asarray(t)


class _AssetWriter:
    """Encodes and writes pictures on a background thread while the test session goes on.

    OpenCV encodes and writes a picture in one call without the GIL, so on a machine whose other core
    idles while pytest runs its items, the report costs the run far less. ``flush()`` waits for every
    pending file and re-raises the first failure; the page is only written after it, and xdist workers
    flush before they finish.
    """

    def __init__(self) -> None:
        self._pool: Any = None
        self._pending: list[Any] = []

    def submit(self, fn: Any, *args: Any) -> None:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-audit-assets",
                                            initializer=_lower_priority)
        self._pending.append(self._pool.submit(fn, *args))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        for error in errors:
            if error is not None:
                raise error


def _lower_priority() -> None:
    """Make the picture thread yield to the model: on Linux a thread's nice value is its own."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


_WRITER = _AssetWriter()


def flush_assets() -> None:
    """Wait until every picture submitted by ``render_case_assets`` is on disk (re-raises failures)."""
    _WRITER.flush()


def _save_all(pictures: list[tuple[np.ndarray, str]]) -> None:
    for pixels, path in pictures:
        _write_picture(pixels, path)


def _write_picture(pixels: np.ndarray, path: str) -> None:
    """Encode and write one picture of this run's asset folder in one OpenCV call.

    ``cv2.imwrite`` holds the interpreter lock for none of its work, which matters on the picture
    thread: every time it wants the lock back it takes the lock from the test session. These files need
    no temp-and-rename of their own: the folder is new and nothing points at it until ``index.html``
    is replaced, the report's commit point. If OpenCV cannot write (it says nothing about why), the
    bytes are written by Python, which raises the error that says why.
    """
    suffix = os.path.splitext(path)[1]
    if not cv2.imwrite(path, _bgr(pixels), _encoding(suffix)):
        atomic_write_bytes(path, _encode(pixels, suffix))


def _save_now(pixels: np.ndarray, path: str) -> None:
    """Write one picture atomically: for files that another xdist worker may write or read at once."""
    atomic_write_bytes(path, _encode(pixels, os.path.splitext(path)[1]))


def _bgr(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., ::-1] if pixels.ndim == 3 else pixels   # a view: OpenCV reads any strides


def _encoding(suffix: str) -> list[int]:
    """JPEG at quality 85 without chroma subsampling (thin outlines keep their colour), or fast PNG.

    PNG uses zlib level 1 with run-length matching and the SUB filter: feature grids are large flat
    areas, and this halves the encoding time for a few percent more bytes.
    """
    if suffix == ".jpg":
        return [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY,
                cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):   # OpenCV >= 4.11: one cheap filter, not a per-row search
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
    return params


def _encode(pixels: np.ndarray, suffix: str) -> bytes:
    """The bytes of a JPEG or PNG file of an RGB (or grey) uint8 array, as ``_encoding`` says."""
    ok, buffer = cv2.imencode(suffix, _bgr(pixels), _encoding(suffix))
    if not ok:
        raise OSError(f"could not encode a {suffix} picture of shape {pixels.shape}")
    return buffer.tobytes()


def _relative(asset_dir: Path, name: str) -> str:
    """Asset path relative to the report folder (``out_dir/assets/<run>/x`` → ``assets/<run>/x``)."""
    return f"{asset_dir.parent.name}/{asset_dir.name}/{name}"


def render_case_assets(asset_dir: Path, stem: str, image: Image.Image, heat: np.ndarray | None,
                       region_outlines: Iterable | None, avoid_outlines: Iterable | None,
                       seen_box: Sequence[float] | None, features: Mapping[str, np.ndarray] | None,
                       max_channels: Mapping[str, int | None] | None, colormap: str = "jet",
                       thumb_size: int = 256, extra: Mapping[tuple[str, str], Any] | None = None) -> dict[str, Any]:
    """Write one case's pictures, sized for a screen, and return their paths relative to the report folder.

    Full-size pictures are capped at 1024 px. Tiny scenes are shown by the page at >= 256 px, pixelated:
    their heatmap and overlay are stored at their own size and the image with its outlines at >= 128 px
    (thin outlines, a quarter of the pixels of drawing it at 256). Thumbnails fit in ``thumb_size``.
    Photos and heatmaps are JPEG, feature grids PNG. The files are encoded and written on a background
    thread: ``flush_assets()`` (called by ``write_report``) waits for them. ``extra`` holds the check
    kinds' own pictures (``{(kind, key): Picture}``: an image, a heatmap, or a heatmap over an image),
    listed under ``out["kinds"][kind][key]``.
    """
    asset_dir = Path(asset_dir)
    asset_dir.mkdir(parents=True, exist_ok=True)
    folder = str(asset_dir)
    stem = safe_stem(stem)
    rgb = _rgb(image)
    factor = _display_factor((rgb.shape[1], rgb.shape[0]), DRAW_MIN)
    display = _for_display(rgb, factor)
    out: dict[str, Any] = {}

    sizes: dict[str, list[int]] = {}  # so the page never reopens a picture to learn its size
    pictures: list[tuple[np.ndarray, str]] = []   # encoded and written in one background job
    relative = _relative(asset_dir, "")

    def put(key: str, picture: np.ndarray, suffix: str = ".jpg", thumb: bool = True) -> None:
        name = f"{stem}-{key.replace('_', '-')}{suffix}"
        pictures.append((picture, os.path.join(folder, name)))
        out[key] = relative + name
        sizes[out[key]] = [picture.shape[1], picture.shape[0]]
        if thumb:
            small = _thumb(picture, thumb_size)
            if small is picture:   # already thumbnail-sized: one file serves both
                out[f"{key}_thumb"] = out[key]
                return
            tname = f"{stem}-{key.replace('_', '-')}-thumb{suffix}"
            pictures.append((small, os.path.join(folder, tname)))
            out[f"{key}_thumb"] = relative + tname
            sizes[out[f"{key}_thumb"]] = [small.shape[1], small.shape[0]]

    # Heatmaps and overlays of tiny scenes stay at their own size: the page scales them up (pixelated).
    base = rgb if factor >= 1.0 else display.copy()   # the outlines are drawn into ``display``
    put("image", _draw_regions(display, region_outlines, avoid_outlines, seen_box, scale=factor))
    base_size = (base.shape[1], base.shape[0])
    if heat is not None:
        colour = colorize(_resize_heat(heat, base_size), colormap)   # one colour picture, two uses
        put("heatmap", colour)
        put("overlay", _blend(base, colour))
        shown_height = _shown_size((display.shape[1], display.shape[0]))[1]
        out["colorbar"] = _shared_colorbar(asset_dir, colormap, min(shown_height, thumb_size))
    kinds: dict[str, dict[str, str]] = {}
    for (kind, key), picture in (extra or {}).items():
        pixels = _kind_picture(picture, base, base_size, colormap)
        if pixels is None:
            continue
        name = f"{kind}_{safe_stem(key, 24).replace('-', '_')}"
        put(name, pixels)
        kinds.setdefault(kind, {})[key] = out[name]
        kinds[kind][f"{key}_thumb"] = out[f"{name}_thumb"]
    out["kinds"] = kinds
    grids: dict[str, str] = {}
    for layer, maps in (features or {}).items():
        maps = np.asarray(maps)
        small = min(maps.shape[1:]) if maps.ndim == 3 else GRID_MIN_TILE
        up = math.ceil(GRID_MIN_TILE / small) if 0 < small < GRID_MIN_TILE else 1
        grid = feature_grid(maps, (max_channels or {}).get(layer), upscale=up)
        name = f"{stem}-grid-{safe_stem(layer, 24)}.png"
        pictures.append((grid, os.path.join(folder, name)))
        grids[layer] = relative + name
        sizes[grids[layer]] = [grid.shape[1], grid.shape[0]]
    out["grids"] = grids
    out["sizes"] = sizes
    _WRITER.submit(_save_all, pictures)
    return out


def _kind_picture(picture: Any, base: np.ndarray, base_size: tuple[int, int], colormap: str) -> np.ndarray | None:
    """The pixels of a check kind's picture: its image (sized like the case's), its heatmap, or both blended."""
    image = getattr(picture, "image", None)
    heat = getattr(picture, "heat", None)
    if image is None and heat is None:
        return None
    rgb = base if image is None else np.asarray(_rgb(image).copy() if image.size == base_size
                                                else np.asarray(_rgb(image.resize(base_size))))
    if heat is None:
        return np.array(rgb)
    colour = colorize(_resize_heat(heat, base_size), colormap)
    return colour if image is None else _blend(np.ascontiguousarray(rgb), colour)


_COLORBARS: set[str] = set()   # colour bars this process has written (one per run, colormap and height)


def _shared_colorbar(asset_dir: Path, colormap: str, height: int) -> str:
    """One colour bar per run, colormap and height, drawn on the picture thread (it holds the text)."""
    name = f"colorbar-{colormap.lower()}-{height}.png"
    path = os.path.join(asset_dir, name)
    if path not in _COLORBARS:
        _COLORBARS.add(path)
        _WRITER.submit(_write_colorbar, colormap, height, path)
    return _relative(asset_dir, name)


def _write_colorbar(colormap: str, height: int, path: str) -> None:
    if not os.path.exists(path):   # another xdist worker may have written it already
        _save_now(colorbar(colormap, height), path)


# --------------------------------------------------------------------------------------------------
# report folder (controller)


def check_writable(out_dir: Path) -> None:
    """Fail at session start, before any model runs, if the report could not be written at the end."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except FileExistsError:
        raise AuditError(f"report folder {out_dir} is not writable: it exists and is not a folder") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.filename and str(exc.filename) != str(out_dir):
            reason = f"{reason} ({exc.filename})"
        raise AuditError(f"report folder {out_dir} is not writable: {reason}") from None


def new_run_dir(out_dir: Path) -> tuple[str, Path]:
    """A fresh ``out_dir/assets/<run_id>/`` for this run's pictures (timestamp + random, never reused)."""
    assets = Path(out_dir) / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    while True:
        run_id = f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        try:
            (assets / run_id).mkdir()
            return run_id, assets / run_id
        except FileExistsError:
            continue


def discard_run_dir(out_dir: Path, run_id: str | None) -> None:
    """Remove this run's (unused) asset folder: a run that wrote no page leaves the folder as it found it."""
    if run_id is None or not RUN_ID_PATTERN.match(run_id):
        return
    folder = Path(out_dir) / "assets" / run_id
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        (Path(out_dir) / "assets").rmdir()   # only when empty


def _results_json(run: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> str:
    """``results.json``: plain JSON, NaN and inf as null.

    The cases were rebuilt from JSON records, so they usually are plain JSON already; the slower walk
    through ``_jsonable`` only runs when they are not (numpy values, NaN from a metric, paths).
    """
    payload = {"schema_version": SCHEMA_VERSION, "run": dict(run), "cases": [dict(c) for c in cases]}
    try:
        return json.dumps(payload, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_jsonable(payload), ensure_ascii=False)


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars and arrays, paths and tuples converted; NaN/inf become null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


_ENV: "jinja2.Environment | None" = None


def _env() -> "jinja2.Environment":
    """The template environment (jinja2 is imported here, not at module import: see ``warm_up``)."""
    global _ENV
    if _ENV is None:
        import jinja2

        env = jinja2.Environment(loader=jinja2.PackageLoader("audit", "templates"),
                                 autoescape=jinja2.select_autoescape(["html", "xml"]),
                                 undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                 bytecode_cache=_template_cache())
        env.filters["num"] = _fmt_num
        env.filters["pct"] = lambda v: "" if v is None else f"{100.0 * float(v):.1f}%"
        _ENV = env
    return _ENV


def _template_cache() -> "jinja2.BytecodeCache | None":
    """jinja2's cache of compiled templates, so the page is compiled once per machine (~25 ms), not per run.

    It is jinja2's ``FileSystemBytecodeCache`` in its default folder: private to the user (0700; jinja2
    refuses a folder that someone else owns or that is a link) and keyed by a hash of the template's
    source, so an edited or upgraded template is compiled afresh. A cache that cannot be read or
    written is skipped: the page is then compiled as if there were none.
    """
    import jinja2

    class TemplateCache(jinja2.FileSystemBytecodeCache):
        def load_bytecode(self, bucket: "jinja2.bccache.Bucket") -> None:
            with contextlib.suppress(OSError):
                super().load_bytecode(bucket)

        def dump_bytecode(self, bucket: "jinja2.bccache.Bucket") -> None:
            with contextlib.suppress(OSError):
                super().dump_bytecode(bucket)

    try:
        return TemplateCache()
    except (OSError, RuntimeError):   # no usable temp folder, or one that is not ours
        return None


def warm_up(page: bool = True) -> None:
    """Do the report's one-time work on the picture thread at session start.

    That is: import jinja2 and compile the page (~50 ms; ~15 ms once jinja2's cache holds the compiled
    page), and draw the channel labels of feature grids (OpenCV's first text call in a thread costs
    ~25 ms). The session's own start (importing torch,
    loading the model) leaves the second core idle, so this costs the run next to nothing there, where
    in the middle or at the end of the run it would add to it. ``flush_assets`` waits for it like for
    any picture. Workers of pytest-xdist pass ``page=False``: only the controller writes the page.
    """
    _WRITER.submit(_first_use, page)


def _first_use(page: bool) -> None:
    for scale in LABEL_SCALES:
        for index in range(128):   # the classic grids show 64 and 72 maps; more are drawn when needed
            _label_stamp(index, scale)
    if page:
        _env().get_template("report.html")


def _fmt_num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


class _Assets:
    """Turns asset paths from the cases into what the page needs: URL (or data URI) and pixel size."""

    MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

    def __init__(self, out_dir: Path, self_contained: bool, sizes: Mapping[str, Sequence[int]] | None = None):
        self.out_dir = out_dir
        self.self_contained = self_contained
        self.sizes = dict(sizes or {})  # asset path → [width, height], recorded when it was drawn
        self._listings: dict[str, frozenset[str]] = {}

    def exists(self, rel: str | None) -> bool:
        """Whether the report folder holds this file: one directory listing per folder, not a stat each."""
        if not rel:
            return False
        folder, _, name = rel.rpartition("/")
        if folder not in self._listings:
            try:
                with os.scandir(self.out_dir / folder) as entries:
                    self._listings[folder] = frozenset(e.name for e in entries if e.is_file())
            except OSError:
                self._listings[folder] = frozenset()
        return name in self._listings[folder]

    def picture(self, rel: str | None, thumb_rel: str | None = None) -> dict | None:
        """``{"src", "href", "width", "height"}`` of a picture shown as a thumbnail linking to full size."""
        if not self.exists(rel):
            return None
        shown_rel = thumb_rel if thumb_rel and self.exists(thumb_rel) else rel
        size = self.sizes.get(shown_rel)
        if size is None:   # a picture drawn without its size (the shared colour bar): read its header once
            size = self.sizes[shown_rel] = _image_size(self.out_dir / shown_rel)
        pixelated = max(size) < DISPLAY_MIN  # tiny scene pictures: the browser scales them up
        width, height = _shown_size(size)
        if self.self_contained:
            # browsers refuse to navigate to data: URLs, so the page embeds the full picture once and
            # shows it at thumbnail size; a click enlarges it in place (see report.js).
            return {"src": self._data_uri(self.out_dir / rel), "href": None, "width": width, "height": height,
                    "pixelated": pixelated}
        href = quote(rel)
        return {"src": href if shown_rel == rel else quote(shown_rel), "href": href,
                "width": width, "height": height, "pixelated": pixelated}

    def _data_uri(self, path: Path) -> str:
        mime = self.MIME.get(path.suffix.lower(), "application/octet-stream")
        return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:   # reads the header only
        return im.size


OUTCOME_ORDER = ("failed", "error", "passed", "skipped")


def _as_written(image: str | None, spec: str | None) -> str | None:
    """The image path as the spec's author wrote it: relative to the spec's folder when inside it."""
    if not image or not spec:
        return image
    folder = _spec_folder(spec)
    if image.startswith(folder):   # the usual case, without a system call per path component
        return image[len(folder):].replace(os.sep, "/")
    try:
        return Path(image).resolve().relative_to(Path(spec).resolve().parent).as_posix()
    except (ValueError, OSError):
        return image


@functools.lru_cache(maxsize=256)
def _spec_folder(spec: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(spec)), "")


# Every key the page reads, per kind of record. ``_filled`` gives each missing one the value None, so the
# template can subscript (``c["error"]``) where ``c.get("error")`` would cost a jinja2 call per use.
_CASE_KEYS = dict.fromkeys(("nodeid", "spec", "line", "case_id", "model", "image", "image_size", "top_k",
                            "target", "checks", "regions", "crops", "assets", "kinds", "error", "features"))
_NESTED_KEYS = {
    "checks": dict.fromkeys(("kind", "outcome", "message", "metrics", "duration_s")),
    "top_k": dict.fromkeys(("index", "label", "prob", "expected")),
}
_METRIC_KEYS = dict.fromkeys(("name", "value", "threshold", "op", "passed"))
_TARGET_KEYS = dict.fromkeys(("index", "label"))
_REGIONS_KEYS = dict.fromkeys(("region", "avoid"))


def _filled(record: Mapping[str, Any] | None, keys: dict[str, None]) -> dict[str, Any] | None:
    return {**keys, **record} if record else None


def _page_record(case: Mapping[str, Any]) -> dict[str, Any]:
    """The case with every key the page reads present (records from other versions may lack some)."""
    c = {**_CASE_KEYS, **case}
    for key, keys in _NESTED_KEYS.items():
        c[key] = [{**keys, **entry} for entry in c[key] or ()]
    for check in c["checks"]:
        check["metrics"] = [{**_METRIC_KEYS, **m} for m in check["metrics"] or ()]
    c["target"] = _filled(c["target"], _TARGET_KEYS)
    c["regions"] = _filled(c["regions"], _REGIONS_KEYS)
    c["kinds"] = dict(c["kinds"] or {})
    return c


@functools.lru_cache(maxsize=1)
def _kind_templates() -> frozenset[str]:
    """The check kinds that ship a section of their own (``templates/kinds/<name>.html``)."""
    return frozenset(name[len("kinds/"):-len(".html")] for name in _env().list_templates()
                     if name.startswith("kinds/") and name.endswith(".html"))


def _kind_sections(case: Mapping[str, Any], assets: "_Assets") -> list[dict[str, Any]]:
    """Each check kind's own part of a card: its data and its pictures, laid out by its template."""
    pictures = (case["assets"] or {}).get("kinds") or {}
    sections = []
    for name in dict.fromkeys([*case["kinds"], *pictures]):
        if name not in _kind_templates():
            continue
        own = pictures.get(name) or {}
        sections.append({"name": name, "template": f"kinds/{name}.html", "data": case["kinds"].get(name),
                         "pictures": {k: assets.picture(v, own.get(f"{k}_thumb"))
                                      for k, v in own.items() if not k.endswith("_thumb")}})
    return sections


def _case_view(case: Mapping[str, Any], assets: _Assets) -> dict[str, Any]:
    """Everything one card shows, resolved to pictures and plain values (the template only lays out)."""
    case = _page_record(case)
    a = case["assets"] or {}
    features = []
    for f in case.get("features") or []:
        shape = list(f.get("shape") or [])
        c, h, w = (shape + [None, None, None])[:3]
        features.append({"layer": f.get("layer"), "maps": c, "h": h, "w": w, "shown": f.get("shown"),
                         "picture": assets.picture((a.get("grids") or {}).get(f.get("layer")))})
    nodeid = str(case.get("nodeid") or "")
    return {
        "case": case,
        "image_path": _as_written(case.get("image"), case.get("spec")),
        "anchor": "case-" + safe_stem(nodeid or str(case.get("case_id"))),
        "outcome": case.get("outcome") or "error",
        "image": assets.picture(a.get("image"), a.get("image_thumb")),
        "heatmap": assets.picture(a.get("heatmap"), a.get("heatmap_thumb")),
        "overlay": assets.picture(a.get("overlay"), a.get("overlay_thumb")),
        "colorbar": assets.picture(a.get("colorbar")),
        "kinds": _kind_sections(case, assets),
        "features": features,
        "duration_s": sum(float(c.get("duration_s") or 0.0) for c in case.get("checks") or []),
    }


def _views(cases: Iterable[Mapping[str, Any]], assets: _Assets) -> Iterator[dict[str, Any]]:
    for case in cases:
        yield _case_view(case, assets)


def _run_view(run: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    counts = {k: 0 for k in OUTCOME_ORDER}
    counts.update({k: int(v) for k, v in (run.get("counts") or {}).items()})
    if not run.get("counts"):
        for c in cases:
            counts[c.get("outcome") or "error"] = counts.get(c.get("outcome") or "error", 0) + 1
    return {"run": run, "counts": counts, "total": len(cases), "models": run.get("models") or [],
            "versions": run.get("versions") or {}}


def _write_temp(out_dir: Path, prefix: str, chunks: Iterable[str], temps: list[str]) -> str:
    fd, tmp = create_temp(out_dir, prefix=prefix, suffix=".tmp")
    temps.append(tmp)
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
        chunks = iter(chunks)
        while batch := list(itertools.islice(chunks, 1024)):   # the page comes in ~200 chunks per card
            fh.write("".join(batch))
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def write_report(out_dir: Path, run: Mapping[str, Any], cases: Sequence[Mapping[str, Any]], run_id: str,
                 self_contained: bool = False) -> Path:
    """Write ``results.json`` and ``index.html`` so the folder always holds one whole, readable report.

    Both are rendered into temp files next to their targets and moved in with ``os.replace``;
    ``index.html`` goes last and is the commit point. Only then are older runs' asset folders removed.
    Any exception (KeyboardInterrupt included) before that leaves the previous report untouched.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flush_assets()
    cases = list(cases)
    temps: list[str] = []
    try:
        json_tmp = _write_temp(out_dir, ".results-", [_results_json(run, cases)], temps)
        assets = _Assets(out_dir, self_contained,
                         {k: v for c in cases for k, v in ((c.get("assets") or {}).get("sizes") or {}).items()})
        template = _env().get_template("report.html")
        html = template.generate(**_run_view(run, cases), cases=_views(cases, assets), run_id=run_id,
                                 self_contained=self_contained, nonce=secrets.token_urlsafe(12),
                                 schema_version=SCHEMA_VERSION)
        html_tmp = _write_temp(out_dir, ".index-", html, temps)
        os.replace(json_tmp, out_dir / "results.json")
        temps.remove(json_tmp)
        os.replace(html_tmp, out_dir / "index.html")
        temps.remove(html_tmp)
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _prune_assets(out_dir, keep=None if self_contained else run_id)
    return out_dir / "index.html"


def _prune_assets(out_dir: Path, keep: str | None) -> None:
    """Remove asset folders of other runs (only names we create); everything else is the user's."""
    assets = out_dir / "assets"
    if not assets.is_dir():
        return
    for child in assets.iterdir():
        if child.is_dir() and not child.is_symlink() and RUN_ID_PATTERN.match(child.name) and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)
    with contextlib.suppress(OSError):
        assets.rmdir()   # only succeeds when empty


class ReportWriter:
    """One report folder: the plugin keeps one of these in ``config.stash`` for the session."""

    def __init__(self, out_dir: Path, self_contained: bool = False, colormap: str = "jet"):
        self.out_dir = Path(out_dir)
        self.self_contained = self_contained
        self.colormap = colormap
        self.run_id: str | None = None
        self.asset_dir: Path | None = None

    def check_writable(self) -> None:
        check_writable(self.out_dir)

    def new_run_dir(self) -> tuple[str, Path]:
        self.run_id, self.asset_dir = new_run_dir(self.out_dir)
        return self.run_id, self.asset_dir

    def write(self, run: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> Path:
        if self.run_id is None:
            raise RuntimeError("ReportWriter.write called before new_run_dir")
        return write_report(self.out_dir, run, cases, self.run_id, self.self_contained)
