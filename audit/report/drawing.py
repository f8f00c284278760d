"""Pure pixel work for the report: arrays and PIL images in, new RGB (or grey) uint8 arrays out.

Feature grids (``grid_columns``, ``feature_grid`` and their channel labels), colour maps
(``colorize``, ``overlay``, ``colorbar``), region outlines (``draw_regions``: expected solid green,
avoid dashed red, what the model did not see greyed), the hottest point, heatmaps laid onto the seen
box, and the sizes pictures are drawn and shown at (``_display_factor``, ``_shown_size``, thumbnails).
Nothing here writes a file or knows the report folder, and nothing here imports from the rest of
:mod:`audit.report`. No torch.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

import cv2
import numpy as np
from PIL import Image

from audit.errors import UnknownNameError, closest

COLORMAPS = {"jet": cv2.COLORMAP_JET, "viridis": cv2.COLORMAP_VIRIDIS, "turbo": cv2.COLORMAP_TURBO,
             "inferno": cv2.COLORMAP_INFERNO, "magma": cv2.COLORMAP_MAGMA}

GREEN = (0, 220, 0)
RED = (255, 40, 40)
SEEN = (255, 200, 0)

DISPLAY_MAX = 1024   # long side of full-size images in the report
DISPLAY_MIN = 256    # the page shows small images (64x64 scenes) at least this large, pixelated
DRAW_MIN = 128       # ... and their outlines are drawn at >= this size (half the pixels to draw and encode)
GRID_MIN_TILE = 48   # feature maps smaller than this are upscaled (nearest) so the tiles are visible
LABEL_SCALES = (0.8, 0.6)   # channel labels on tiles of >= 64 px and on smaller ones


# --------------------------------------------------------------------------------------------------
# feature grids


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


# --------------------------------------------------------------------------------------------------
# colour maps


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


# --------------------------------------------------------------------------------------------------
# regions and points


def _points(outline: Sequence[Sequence[float]], scale: float) -> np.ndarray:
    return np.array([[round(float(x) * scale), round(float(y) * scale)] for x, y in outline], dtype=np.int32)


def _dashed(img: np.ndarray, pts: np.ndarray, colour, thickness: int, dash: int) -> None:
    """Red dashes over a white line: one of the two colours shows on any background (a red heatmap too)."""
    cv2.polylines(img, [pts], True, (255, 255, 255), thickness, cv2.LINE_AA)
    closed = np.vstack([pts, pts[:1]]).astype(np.float64)
    for (x0, y0), (x1, y1) in zip(closed[:-1], closed[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        steps = max(1, int(length // dash))
        for k in range(0, steps, 2):
            a, b = k / steps, min(1.0, (k + 1) / steps)
            p = (int(round(x0 + (x1 - x0) * a)), int(round(y0 + (y1 - y0) * a)))
            q = (int(round(x0 + (x1 - x0) * b)), int(round(y0 + (y1 - y0) * b)))
            cv2.line(img, p, q, colour, thickness, cv2.LINE_AA)


def hottest_point(heat: np.ndarray) -> tuple[float, float] | None:
    """Centre (x, y) of the first pixel holding the map's maximum (row-major, as the pointing game ties
    it), in the map's own pixels; None for an all-zero map (the pointing game then has no hottest point)."""
    heat = np.asarray(heat, dtype=np.float32)
    if heat.size == 0 or not float(heat.max()) > 0:
        return None
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return float(x) + 0.5, float(y) + 0.5


def _mark_point(img: np.ndarray, point: tuple[float, float]) -> None:
    """A white-ringed black cross: visible on the dark and the bright end of every colormap."""
    h, w = img.shape[:2]
    r = max(3, round(max(w, h) / 40))
    x, y = int(point[0]), int(point[1])
    for colour, thick in (((255, 255, 255), max(3, r // 2)), ((0, 0, 0), max(1, r // 4))):
        cv2.line(img, (x - r, y), (x + r, y), colour, thick, cv2.LINE_AA)
        cv2.line(img, (x, y - r), (x, y + r), colour, thick, cv2.LINE_AA)


def place_in_seen_box(lowres: np.ndarray, seen_box: Sequence[float] | None, size: tuple[int, int]) -> np.ndarray:
    """A low-resolution map (it covers what the model saw) laid onto a picture of ``size`` (w, h): resized
    onto ``seen_box`` (original-image pixels scaled to ``size`` by the caller), zeros outside, as the
    engine maps its own heatmaps; without a box, resized onto the whole picture."""
    lowres = np.asarray(lowres, dtype=np.float32)
    w, h = size
    if seen_box is None:
        return _resize_heat(lowres, (w, h))
    x0, y0, x1, y1 = (int(math.floor(float(v) + 0.5)) for v in seen_box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    out = np.zeros((h, w), np.float32)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = cv2.resize(lowres, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.nan_to_num(out), 0.0, 1.0)


def _crop_border(img: np.ndarray, seen_box: Sequence[float] | None, scale: float) -> np.ndarray:
    """The seen box's amber border on a heatmap, so two maps of a cropping model read alike."""
    if seen_box is None:
        return img
    h, w = img.shape[:2]
    x0, y0, x1, y1 = (float(v) * scale for v in seen_box)
    x0, y0 = max(0, math.floor(x0 + 0.5)), max(0, math.floor(y0 + 0.5))
    x1, y1 = min(w, math.floor(x1 + 0.5)), min(h, math.floor(y1 + 0.5))
    if (x0 > 0 or y0 > 0 or x1 < w or y1 < h) and x1 > x0 and y1 > y0:
        img = img.copy()
        thick = 1 if max(w, h) <= DRAW_MIN else max(2, round(max(w, h) / 300))
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), SEEN, thick, cv2.LINE_AA)
    return img


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
# display sizes and thumbnails


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
