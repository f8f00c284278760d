"""One case's pictures, drawn and written into the run's asset folder by the process that holds the case.

``render_case_assets`` draws with :mod:`audit.report.drawing` and hands the pictures to a background
thread (``_AssetWriter``, ``_WRITER``) that encodes and writes each in one OpenCV call
(``_write_picture``, ``_encoding``). pytest-xdist workers call it and write straight into the run's
folder, so the controller never ships pixels between processes; ``flush_assets`` waits for every
pending file. A check kind's own pictures are ``_kind_picture``; the colour bar is one file per run,
colormap and height, shared by the cases (``_shared_colorbar``). ``safe_stem`` names the files.
"""
from __future__ import annotations

import collections
import hashlib
import math
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image

from audit.files import atomic_write_bytes
from audit.report.drawing import (DRAW_MIN, GRID_MIN_TILE, _blend, _crop_border, _display_factor, _draw_regions,
                                  _for_display, _mark_point, _resize_heat, _rgb, _shown_size, _thumb, colorbar,
                                  colorize, feature_grid, hottest_point, place_in_seen_box)

JPEG_QUALITY = 85


def safe_stem(text: str, max_len: int = 40) -> str:
    """A file-name-safe, collision-free stem for any case id (unicode, HTML, slashes): ascii + short hash."""
    ascii_ = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_).strip("-.")[:max_len].strip("-.")
    digest = hashlib.sha1(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{clean}-{digest}" if clean else digest


# --------------------------------------------------------------------------------------------------
# the picture thread


class _AssetWriter:
    """Encodes and writes pictures on a background thread while the test session goes on.

    OpenCV encodes and writes a picture in one call without the GIL, so on a machine whose other core
    idles while pytest runs its items, the report costs the run far less. ``flush()`` waits for every
    pending file and re-raises the first failure; the page is only written after it, and xdist workers
    flush before they finish.

    Memory stays flat in the number of cases: finished jobs are dropped (their first failure is kept
    for ``flush``) instead of holding one ``Future`` per case to the end (~1.5 KB each: 15 MB at 10,000
    cases), and when ``MAX_PENDING`` jobs wait, ``submit`` waits for the oldest, so a thread that falls
    behind never queues the pixels of the whole run.
    """

    MAX_PENDING = 256

    def __init__(self) -> None:
        self._pool: Any = None
        self._pending: collections.deque = collections.deque()
        self._error: BaseException | None = None

    def submit(self, fn: Any, *args: Any) -> None:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-audit-assets")
        self._pending.append(self._pool.submit(fn, *args))
        while self._pending and (self._pending[0].done() or len(self._pending) > self.MAX_PENDING):
            self._keep_error(self._pending.popleft())   # waits when the oldest is not done yet

    def _keep_error(self, future: Any) -> None:
        error = future.exception()
        if error is not None and self._error is None:
            self._error = error

    def flush(self) -> None:
        while self._pending:
            self._keep_error(self._pending.popleft())
        error, self._error = self._error, None
        if error is not None:
            raise error


_WRITER = _AssetWriter()


def flush_assets() -> None:
    """Wait until every picture submitted by ``render_case_assets`` is on disk (re-raises failures)."""
    _WRITER.flush()


def _save_all(pictures: list[tuple[np.ndarray, str]]) -> None:
    for pixels, path in pictures:
        _write_picture(pixels, path)


# --------------------------------------------------------------------------------------------------
# encoding


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


# --------------------------------------------------------------------------------------------------
# one case's pictures


def _relative(asset_dir: Path, name: str) -> str:
    """Asset path relative to the report folder (``out_dir/assets/<run>/x`` → ``assets/<run>/x``)."""
    return f"{asset_dir.parent.name}/{asset_dir.name}/{name}"


def render_case_assets(asset_dir: Path, stem: str, image: Image.Image, heat: np.ndarray | None,
                       region_outlines: Iterable | None, avoid_outlines: Iterable | None,
                       seen_box: Sequence[float] | None, features: Mapping[str, np.ndarray] | None,
                       max_channels: Mapping[str, int | None] | None, colormap: str = "jet",
                       thumb_size: int = 256, extra: Mapping[tuple[str, str], Any] | None = None,
                       mark_peak: bool = False) -> dict[str, Any]:
    """Write one case's pictures, sized for a screen, and return their paths relative to the report folder.

    Full-size pictures are capped at 1024 px. Tiny scenes are shown by the page at >= 256 px, pixelated:
    their heatmap and overlay are stored at their own size and the image with its outlines at >= 128 px
    (thin outlines, a quarter of the pixels of drawing it at 256). Thumbnails fit in ``thumb_size``.
    The expected and avoid outlines are drawn on the overlay too; ``mark_peak`` draws the hottest point
    on it (pointing-game checks) and records it as ``peak`` (original pixels).
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
    base_scale = base.shape[1] / rgb.shape[1]
    if heat is not None:
        colour = colorize(_resize_heat(heat, base_size), colormap)   # one colour picture, two uses
        put("heatmap", colour)
        blended = _blend(base, colour)
        # the overlay is where QA reads focus: the regions are drawn on it too (the avoid outline in
        # red over white, visible on a red hot spot), and for pointing-game checks the hottest point
        _draw_regions(blended, region_outlines, avoid_outlines, None, scale=base_scale)
        peak = hottest_point(heat) if mark_peak else None
        if peak is not None:
            _mark_point(blended, (peak[0] * base_size[0] / heat.shape[1], peak[1] * base_size[1] / heat.shape[0]))
        put("overlay", blended)
        shown_height = _shown_size((display.shape[1], display.shape[0]))[1]
        out["colorbar"] = _shared_colorbar(asset_dir, colormap, min(shown_height, thumb_size))
        if peak is not None:
            out["peak"] = [round(peak[0] * rgb.shape[1] / heat.shape[1], 1),
                           round(peak[1] * rgb.shape[0] / heat.shape[0], 1)]
    kinds: dict[str, dict[str, str]] = {}
    for (kind, key), picture in (extra or {}).items():
        pixels = _kind_picture(picture, base, base_size, colormap, seen_box, base_scale)
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


def _kind_picture(picture: Any, base: np.ndarray, base_size: tuple[int, int], colormap: str,
                  seen_box: Sequence[float] | None = None, scale: float = 1.0) -> np.ndarray | None:
    """The pixels of a check kind's picture: its image (sized like the case's), its heatmap, or both blended.

    A ``seen_only`` heatmap (a low-res map of what the model saw) is laid onto the seen box and gets
    the crop border, so it reads like the engine's own maps of the case."""
    image = getattr(picture, "image", None)
    heat = getattr(picture, "heat", None)
    if image is None and heat is None:
        return None
    rgb = base if image is None else np.asarray(_rgb(image).copy() if image.size == base_size
                                                else np.asarray(_rgb(image.resize(base_size))))
    if heat is None:
        return np.array(rgb)
    if getattr(picture, "seen_only", False):
        seen = None if seen_box is None else [float(v) * scale for v in seen_box]
        colour = _crop_border(colorize(place_in_seen_box(heat, seen, base_size), colormap), seen_box, scale)
    else:
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
