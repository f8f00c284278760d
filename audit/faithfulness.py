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
- substrates: deletion inpaints the removed pixels from the kept ones (OpenCV Telea, the default),
  because a constant colour draws a silhouette of the hottest area, and a coarse map's silhouette of
  a square *is* a square (measured on 200 unseen shapes scenes: with grey fill the Grad-CAM of
  shapes_vgg beats a random map on 89% of them, with inpainting on 99%). RISE's own substrates stay
  available: ``constant`` (RISE uses zeros of the normalised tensor, i.e. the normalisation mean:
  pass ``fill`` = mean * 255; default black) and ``blur``; insertion reveals onto RISE's blurred copy
  (its 11 px, sigma 5 Gaussian at 224 px, scaled to the image's long side) or a constant.

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
SUBSTRATES = {"deletion": ("inpaint", "blur", "constant"), "insertion": ("blur", "constant")}
DEFAULT_SUBSTRATE = {"deletion": "inpaint", "insertion": "blur"}
INPAINT_RADIUS = 3
DEFAULT_STEPS = 16
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
    substrate: str | None = None          # None: DEFAULT_SUBSTRATE[mode]
    fill: tuple[float, float, float] | None = None   # the constant substrate's colour (default black)


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


def blurred(pixels: np.ndarray) -> np.ndarray:
    """RISE's insertion substrate: a Gaussian blur, sigma 5 at 224 px scaled to the long side."""
    sigma = RISE_BLUR_SIGMA_AT_224 * max(pixels.shape[:2]) / 224.0
    return cv2.GaussianBlur(pixels, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def _constant(pixels: np.ndarray, fill: tuple[float, float, float] | None) -> np.ndarray:
    colour = np.zeros(3) if fill is None else np.asarray(fill, dtype=np.float64)
    return np.broadcast_to(np.clip(np.rint(colour), 0, 255).astype(np.uint8), pixels.shape)


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got {a.dtype} {a.shape}")
    return a


def substrate_of(request: CurveRequest) -> str:
    """The request's substrate, validated against its mode."""
    if request.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {request.mode!r}")
    name = request.substrate or DEFAULT_SUBSTRATE[request.mode]
    if name not in SUBSTRATES[request.mode]:
        raise ValueError(f"{request.mode} substrate must be one of {SUBSTRATES[request.mode]}, got {name!r}")
    return name


def step_images(request: CurveRequest, steps: int = DEFAULT_STEPS) -> Iterator[np.ndarray]:
    """The ``steps + 1`` images of one curve, in order (HxWx3 uint8), produced lazily."""
    pixels = np.ascontiguousarray(_pixels(request.image))
    heat = np.asarray(request.heat)
    if heat.shape != pixels.shape[:2]:
        raise ValueError(f"heat {heat.shape} does not match the image {pixels.shape[:2]}")
    name = substrate_of(request)
    order = pixel_order(heat)
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    rank = rank.reshape(heat.shape)
    sub = None
    if name == "blur":
        sub = blurred(pixels)
    elif name == "constant":
        sub = _constant(pixels, request.fill)
    for count in step_counts(order.size, steps):
        changed = rank < count
        if name == "inpaint":
            if count == 0:
                yield pixels.copy()
            elif count == order.size:
                # nothing left to inpaint from: the image's mean colour, the least informative picture
                yield np.broadcast_to(np.rint(pixels.reshape(-1, 3).mean(0)).astype(np.uint8), pixels.shape).copy()
            else:
                yield cv2.inpaint(pixels, changed.astype(np.uint8) * 255, INPAINT_RADIUS, cv2.INPAINT_TELEA)
        elif request.mode == "deletion":
            yield np.where(changed[..., None], sub, pixels)
        else:
            yield np.where(changed[..., None], pixels, sub)


def curves(requests: Sequence[CurveRequest], predict: Predict, steps: int = DEFAULT_STEPS,
           batch_size: int = 64) -> list[Curve]:
    """Every request's curve, the step images of all requests streamed through ``predict`` in batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for r in requests:
        substrate_of(r)
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


def step_batch(requests: Sequence[CurveRequest], steps: int = DEFAULT_STEPS) -> list[Image.Image]:
    """Every step image of ``requests``, in order, for a caller that predicts them itself (the session
    predicts the follow-up images of a whole batch of cases in one pass)."""
    return [Image.fromarray(img) for r in requests for img in step_images(r, steps)]


def curves_from_probs(requests: Sequence[CurveRequest], probs: np.ndarray, steps: int = DEFAULT_STEPS) -> list[Curve]:
    """The curves of ``requests`` from the probabilities of :func:`step_batch`'s images (same order)."""
    probs = np.asarray(probs, dtype=np.float64)
    n = steps + 1
    if probs.ndim != 2 or probs.shape[0] != n * len(requests):
        raise ValueError(f"expected {n * len(requests)} rows of probabilities, got {probs.shape}")
    fractions = np.arange(n) / steps
    out = []
    for i, r in enumerate(requests):
        p = probs[i * n:(i + 1) * n, r.target].copy()
        out.append(Curve(r.mode, int(r.target), fractions.copy(), p, normalised_auc(p)))
    return out
