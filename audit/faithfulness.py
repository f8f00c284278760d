"""Deletion and insertion curves (RISE, Petsiuk et al. 2018): is the heatmap faithful to the model?

A heatmap claims "these pixels carry the evidence". Deletion tests it: remove the pixels hottest
first, in N equal steps, and watch the class probability; a faithful map makes it fall fast (low area
under the curve). Insertion is the mirror: start from a featureless substrate, reveal the hottest
pixels first; a faithful map makes the probability rise fast (high area).

Definitions (pinned by hand-computed tests):
- pixel order: descending heat, ties broken in row-major order (``np.argsort(-heat, kind="stable")``,
  the same tie rule as ``checks.rank_accuracy``);
- step k of N (k = 0..N) changes the first ``round(k * P / N)`` pixels of that order (P = all pixels):
  the curve has N + 1 points, step 0 being the intact image (deletion) or the bare substrate
  (insertion), step N the reverse;
- the area is the trapezoid rule over the fraction of pixels changed (x from 0 to 1), so it lies in
  [0, 1] because probabilities do: RISE's ``auc`` exactly.
- substrates, as in RISE's code: deletion replaces pixels by a constant colour (RISE uses zeros of the
  normalised tensor, i.e. the normalisation mean: pass ``fill`` = mean * 255 to reproduce it; default
  black); insertion reveals onto a blurred copy (RISE's 11 px, sigma 5 Gaussian at 224 px, scaled to
  the image's long side here).

The steps of many images are streamed through ``predict`` in batches of ``batch_size``: one call per
batch, not one per step, whatever the number of images. ``predict`` is any callable taking a list of
RGB PIL images and returning probabilities ``(n, classes)``; nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image

MODES = ("deletion", "insertion")
DEFAULT_STEPS = 32
RISE_BLUR_SIGMA_AT_224 = 5.0

Predict = Callable[[list[Image.Image]], np.ndarray]


@dataclass(frozen=True, eq=False)
class Curve:
    """One deletion or insertion curve: ``fractions`` (N+1 shares of pixels changed) and ``probs``."""

    mode: str
    target: int
    fractions: np.ndarray = field(repr=False)
    probs: np.ndarray = field(repr=False)
    auc: float = 0.0

    def to_dict(self) -> dict:
        return {"mode": self.mode, "target": int(self.target), "auc": float(self.auc),
                "fractions": [float(f) for f in self.fractions], "probs": [float(p) for p in self.probs]}


@dataclass(frozen=True, eq=False)
class CurveRequest:
    """What to measure: an image (RGB PIL or HxWx3 uint8), its heatmap (HxW, on the image), the class."""

    image: Image.Image | np.ndarray
    heat: np.ndarray
    target: int
    mode: str = "deletion"
    fill: tuple[float, float, float] | None = None


def pixel_order(heat: np.ndarray) -> np.ndarray:
    """Flat pixel indices, hottest first, ties in row-major order."""
    h = np.asarray(heat, dtype=np.float64)
    if h.ndim != 2 or not np.isfinite(h).all():
        raise ValueError(f"heat must be a finite 2-D map, got shape {h.shape}")
    return np.argsort(-h.ravel(), kind="stable")


def step_counts(n_pixels: int, steps: int) -> np.ndarray:
    """How many pixels are changed at each of the ``steps + 1`` points: round(k * P / N)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    k = np.arange(steps + 1, dtype=np.int64)
    # integer arithmetic: round half up of k*P/N without float error
    return (2 * k * n_pixels + steps) // (2 * steps)


def normalised_auc(probs: Sequence[float]) -> float:
    """Trapezoid area under probabilities sampled at equal steps over x in [0, 1]."""
    p = np.asarray(probs, dtype=np.float64)
    if p.size < 2:
        raise ValueError("a curve needs at least 2 points")
    return float((p.sum() - (p[0] + p[-1]) / 2.0) / (p.size - 1))


def substrate(pixels: np.ndarray, mode: str, fill: tuple[float, float, float] | None = None) -> np.ndarray:
    """What replaces (deletion) or underlies (insertion) the image: constant colour or RISE's blur."""
    if mode == "deletion":
        colour = np.zeros(3) if fill is None else np.asarray(fill, dtype=np.float64)
        return np.broadcast_to(np.clip(np.rint(colour), 0, 255).astype(np.uint8), pixels.shape).copy()
    if mode == "insertion":
        sigma = RISE_BLUR_SIGMA_AT_224 * max(pixels.shape[:2]) / 224.0
        return cv2.GaussianBlur(pixels, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got {a.dtype} {a.shape}")
    return a


def step_images(request: CurveRequest, steps: int = DEFAULT_STEPS) -> Iterator[np.ndarray]:
    """The ``steps + 1`` images of one curve, in order (HxWx3 uint8), produced lazily."""
    pixels = _pixels(request.image)
    heat = np.asarray(request.heat)
    if heat.shape != pixels.shape[:2]:
        raise ValueError(f"heat {heat.shape} does not match the image {pixels.shape[:2]}")
    order = pixel_order(heat)
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    rank = rank.reshape(heat.shape)
    sub = substrate(pixels, request.mode, request.fill)
    changed_src, kept_src = (sub, pixels) if request.mode == "deletion" else (pixels, sub)
    for count in step_counts(order.size, steps):
        changed = (rank < count)[..., None]
        yield np.where(changed, changed_src, kept_src)


def curves(requests: Sequence[CurveRequest], predict: Predict, steps: int = DEFAULT_STEPS,
           batch_size: int = 64) -> list[Curve]:
    """Every request's curve, the step images of all requests streamed through ``predict`` in batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for r in requests:
        if r.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {r.mode!r}")
    probs = [np.empty(steps + 1) for _ in requests]
    pending: list[Image.Image] = []
    slots: list[tuple[int, int]] = []

    def flush() -> None:
        if not pending:
            return
        out = np.asarray(predict(list(pending)), dtype=np.float64)
        if out.ndim != 2 or out.shape[0] != len(pending):
            raise ValueError(f"predict returned shape {out.shape} for {len(pending)} images")
        for row, (i, k) in zip(out, slots):
            probs[i][k] = row[requests[i].target]
        pending.clear()
        slots.clear()

    for i, request in enumerate(requests):
        for k, img in enumerate(step_images(request, steps)):
            pending.append(Image.fromarray(img))
            slots.append((i, k))
            if len(pending) >= batch_size:
                flush()
    flush()
    fractions = np.arange(steps + 1) / steps
    return [Curve(r.mode, int(r.target), fractions.copy(), p, normalised_auc(p)) for r, p in zip(requests, probs)]


def random_heat(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A uniform random heatmap (the chance-level baseline a faithful map must beat)."""
    return np.random.default_rng(seed).random(shape)
