"""Pure numpy metrics behind the evidence checks: avoid-region density, rank and map correlation.

Why a density next to ``energy_in_avoid``: the energy share of a small region is small even when the
heat is concentrated on it (a 6x6 marker is 0.9% of a 64x64 image, so 3% of the heat there is more
than three times the image's mean density). Density relative to the mean says "how much hotter than
average is this region", independent of its size: 1.0 means as hot as the image on average.

Same conventions as ``audit.checks``: heat is a finite float array >= 0, masks are bool of the same
shape; anything else is our bug (``ValueError``); never NaN (an all-zero or constant input has a
defined value, documented per function).
"""
from __future__ import annotations

import numpy as np


def _heat(heat: np.ndarray, name: str = "heat") -> np.ndarray:
    h = np.asarray(heat, dtype=np.float64)
    if h.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {h.shape}")
    if not np.isfinite(h).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if (h < 0).any():
        raise ValueError(f"{name} must be non-negative (a ReLU'd map)")
    return h


def density_ratio(heat: np.ndarray, mask: np.ndarray) -> float:
    """Mean heat inside ``mask`` divided by the mean heat of the whole map.

    Equals ``energy_inside(heat, mask) * N / |R|``. 1.0: the region is as hot as the image on average;
    above 1: hotter. An all-zero map gives 0.0 (no heat anywhere, so none in the region).
    """
    h = _heat(heat)
    m = np.asarray(mask)
    if m.dtype != bool or m.shape != h.shape:
        raise ValueError(f"mask must be bool of shape {h.shape}, got {m.dtype} {m.shape}")
    inside = int(m.sum())
    if inside == 0:
        raise ValueError("mask is empty")
    total = float(h.sum())
    if total <= 0.0:
        return 0.0
    return float(h[m].sum() / inside) / (total / h.size)


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, ties given their average rank (scipy.stats.rankdata 'average')."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    # start index of each run of equal values
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_v)) + 1]
    ends = np.r_[starts[1:], v.size]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def _pearson_flat(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    na, nb = float(np.sqrt((a * a).sum())), float(np.sqrt((b * b).sum()))
    if na == 0.0 or nb == 0.0:
        return 1.0 if (na == 0.0 and nb == 0.0) else 0.0
    return float(np.clip((a * b).sum() / (na * nb), -1.0, 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps of the same shape (Pearson of average ranks).

    Constant maps, which have no ranking: both constant -> 1.0 (nothing changed), one constant -> 0.0.
    This is what the sanity check (Adebayo et al. 2018) compares: trained vs randomised-model maps.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("maps contain NaN or infinite values")
    return _pearson_flat(rankdata(a), rankdata(b))


def heatmap_follows(variant_heat: np.ndarray, mapped_original_heat: np.ndarray) -> float:
    """Pearson correlation of a geometric variant's heatmap with the original's heatmap mapped onto it.

    For ``hflip``: the map of the flipped image against the flipped map. 1.0 when the explanation
    moves with the object; near 0 when it stays put or goes elsewhere. Both empty (all zero) -> 1.0,
    one empty -> 0.0.
    """
    a = _heat(variant_heat, "variant heat")
    b = _heat(mapped_original_heat, "mapped heat")
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")
    return _pearson_flat(a.ravel(), b.ravel())
