"""The checks: pure functions from what the model did to a ``CheckResult`` (numpy only, never torch).

Two families. Prediction checks compare the model's ranked top-k with the spec's expectations. Focus
checks compare a Grad-CAM heatmap H (on the original image, non-negative: after ReLU) with an expected
region R (a bool mask, rows y, columns x), with the definitions of docs/ARCHITECTURE.md ("audit/checks.py"):

- ``energy_inside``: sum of H over R / sum of H (energy-based pointing game, Score-CAM; Quantus'
  relevance mass accuracy on a ReLU'd map).
- ``pointing_game``: hit when some pixel of R lies within ``tolerance_px`` (Euclidean distance between
  pixel coordinates) of a hottest pixel; when several pixels share the maximum, any of them may hit,
  but a uniform map (every pixel shares it) points nowhere and never hits.
- ``iou_at``: IoU of {H >= fraction * max H} with R.
- ``rank_accuracy``: of the |R| hottest pixels, the share in R; pixels tied at the cut share the
  remaining places (fractional credit, the mean over every tie order), and zero heat is never credited.
- ``auc``: the area under the ROC curve of H as a score for "pixel in R" (Quantus' AUC): the chance
  that a pixel of R is hotter than a pixel outside, ties counted half. No threshold, no tie order.

An all-zero heatmap is a result, not an error: every metric returns its "nothing found" value (0.0 or
False, never NaN) and ``check_focus`` fails every requested check with the reason. Invalid inputs
(shape mismatch, negative or non-finite heat, an empty mask) raise ``ValueError``: they are our bugs
(regions and the engine exclude them), so they keep their traceback.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from audit import defaults

OK, FAIL = "ok", "FAIL"


# --------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Metric:
    """One measured number (or verdict) with the threshold it was held to."""

    name: str
    value: float | int | bool
    threshold: float | int | bool | None
    op: str
    passed: bool

    def __str__(self) -> str:
        status = OK if self.passed else FAIL
        if isinstance(self.value, bool):
            shown = ("hit" if self.value else "miss") if self.name == "pointing_game" else str(self.value)
            return f"{self.name}={shown} {status}"
        if self.threshold is None:
            return f"{self.name}={_fmt(self.value)} {status}"
        value, threshold = _fmt_pair(self.value, self.threshold)
        return f"{self.name}={value} {self.op} {threshold} {status}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": _plain(self.value), "threshold": _plain(self.threshold),
                "op": self.op, "passed": bool(self.passed)}


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: the verdict, a message for the spec author, and the numbers behind it."""

    kind: str
    passed: bool
    message: str
    metrics: tuple[Metric, ...] = ()
    data: Mapping[str, Any] | None = None   # JSON-ready extras a kind summarises at the end of the run

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (Python scalars only) for results.json."""
        out = {"kind": self.kind, "passed": bool(self.passed), "message": self.message,
               "metrics": [m.to_dict() for m in self.metrics]}
        if self.data:
            out["data"] = dict(self.data)
        return out


@dataclass(frozen=True)
class Ranked:
    """One entry of a model's ranked prediction; the engine's own type has the same three attributes."""

    index: int
    label: str
    prob: float


# ---------------------------------------------------------------------------------- prediction checks

@dataclass(frozen=True)
class PredictionExpectation:
    """What a spec expects of the top-k, with labels already resolved to class indices."""

    top_k: int
    top1: int | None = None
    in_top_k: tuple[int, ...] = ()
    any_in_top_k: tuple[int, ...] = ()
    not_in_top_k: tuple[int, ...] = ()
    min_prob: float | None = None
    top1_any: tuple[int, ...] = ()
    """``top1_is_label``: the top-1 must be one of these (a dataset class mapped to model labels)."""
    top1_any_label: str = ""
    """The dataset class ``top1_any`` stands for, for the message."""


def check_prediction(ranked: Sequence[Any], expectation: PredictionExpectation,
                     name_of: Callable[[int], str]) -> CheckResult:
    """Evaluate every expectation (not only up to the first failure) so one run shows all that broke.

    ``ranked`` is sorted by probability, best first, and may be longer than ``top_k``: membership uses
    the first ``top_k`` entries, while probabilities and ranks are looked up in the whole list.
    """
    k = expectation.top_k
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if not ranked:
        raise ValueError("ranked is empty: the engine must return at least one class")
    top = list(ranked[:k])
    top_idx = [int(r.index) for r in top]
    where = {int(r.index): (pos + 1, float(r.prob)) for pos, r in enumerate(ranked)}

    def who(index: int) -> str:
        return f"{name_of(index)!r} (#{index})"

    def seen(index: int) -> str:
        if index in where:
            rank, p = where[index]
            return f"rank {rank}, p={p:.3f}"
        return f"not among the {len(ranked)} ranked classes, p<{float(ranked[-1].prob):.3f}"

    metrics: list[Metric] = []
    failures: list[str] = []
    best = ranked[0]

    if expectation.top1 is not None:
        want = int(expectation.top1)
        ok = int(best.index) == want
        metrics.append(Metric("top1", int(best.index), want, "==", ok))
        if not ok:
            failures.append(f"top1: expected {who(want)}, got {who(int(best.index))} p={float(best.prob):.2f}"
                            f" (expected class: {seen(want)})")

    if expectation.top1_any:
        wanted = [int(c) for c in expectation.top1_any]
        ok = int(best.index) in wanted
        metrics.append(Metric("top1_is_label", ok, True, "==", ok))
        if not ok:
            label = expectation.top1_any_label
            if len(wanted) == 1:
                same = name_of(wanted[0]).strip().lower() == label.strip().lower()
                options = f"{who(wanted[0])}, the case's label" + ("" if same else f" {label!r}")
            else:
                options = f"any of {', '.join(who(c) for c in wanted)} (the case's label {label!r})"
            nearest = min(wanted, key=lambda c: where.get(c, (len(ranked) + 1, 0.0))[0])
            failures.append(f"top1_is_label: expected {options}, got {who(int(best.index))} "
                            f"p={float(best.prob):.2f} ({'it' if len(wanted) == 1 else who(nearest)}: {seen(nearest)})")

    for c in expectation.in_top_k:
        c = int(c)
        ok = c in top_idx
        metrics.append(Metric(f"in_top_k[{c}]", ok, True, "==", ok))
        if not ok:
            failures.append(f"in_top_k: {who(c)} not in top-{k} ({seen(c)})")

    if expectation.any_in_top_k:
        wanted = [int(c) for c in expectation.any_in_top_k]
        ok = any(c in top_idx for c in wanted)
        metrics.append(Metric("any_in_top_k", ok, True, "==", ok))
        if not ok:
            failures.append(f"any_in_top_k: none of {', '.join(who(c) for c in wanted)} in top-{k}")

    for c in expectation.not_in_top_k:
        c = int(c)
        ok = c not in top_idx
        metrics.append(Metric(f"not_in_top_k[{c}]", ok, True, "==", ok))
        if not ok:
            failures.append(f"not_in_top_k: {who(c)} is in top-{k} ({seen(c)})")

    if expectation.min_prob is not None:
        metric, failure = _min_prob(ranked, expectation, where, name_of)
        metrics.append(metric)
        if failure:
            failures.append(failure)

    summary = f"top1 {name_of(int(best.index))} {float(best.prob):.2f}"
    if not failures:
        n = len(metrics)
        tail = f"all {n} expectation{'s' if n != 1 else ''} met" if n else "no expectations"
        return CheckResult("prediction", True, f"{summary}; {tail}", tuple(metrics))
    lines = [f"prediction: {len(failures)} of {len(metrics)} expectations not met ({summary})"]
    lines += [f"  {f}" for f in failures]
    shown = list(ranked[:max(5, k)])
    lines.append(f"top-{len(shown)}:")
    lines += [f"  {i}. {name_of(int(r.index))} #{int(r.index)} {float(r.prob):.3f}"
              for i, r in enumerate(shown, 1)]
    return CheckResult("prediction", False, "\n".join(lines), tuple(metrics))


def _min_prob(ranked: Sequence[Any], expectation: PredictionExpectation, where: dict[int, tuple[int, float]],
              name_of: Callable[[int], str]) -> tuple[Metric, str | None]:
    """The floor applies to the expected top-1 class when there is one, else to the predicted top-1.

    An expected class missing from ``ranked`` has a probability below the last ranked one; the floor
    cannot be confirmed, so it counts as not met, and the message says it is only a bound.
    """
    floor = float(expectation.min_prob)  # type: ignore[arg-type]
    target = int(expectation.top1) if expectation.top1 is not None else int(ranked[0].index)
    name = name_of(target)
    if target in where:
        p = where[target][1]
        ok = p >= floor
        pv, fv = _fmt_pair(p, floor)
        return Metric("min_prob", p, floor, ">=", ok), (None if ok else f"min_prob: p({name})={pv} < {fv}")
    bound = float(ranked[-1].prob)
    return (Metric("min_prob", bound, floor, ">=", False),
            f"min_prob: p({name})<{bound:.2f} (not among the {len(ranked)} ranked classes), "
            f"cannot confirm >= {floor:.2f}")


# ------------------------------------------------------------------------------------- focus metrics

def heat_is_empty(heat: np.ndarray) -> bool:
    """True when no pixel is positive: after ReLU the heatmap says nothing, and no check may pass."""
    return not bool(np.any(np.asarray(heat) > 0))


def energy_inside(heat: np.ndarray, mask: np.ndarray) -> float:
    """sum(H over R) / sum(H) in [0, 1]; 0.0 for an all-zero heatmap (never NaN)."""
    heat, mask = _validate(heat, mask)
    total = float(heat.sum(dtype=np.float64))
    if total <= 0.0:
        return 0.0
    inside = float(heat[mask].sum(dtype=np.float64))
    return min(1.0, max(0.0, inside / total))  # clamp summation-order rounding only


def pointing_game(heat: np.ndarray, mask: np.ndarray, tolerance_px: float = 0.0) -> bool:
    """Hit when a pixel of R lies within ``tolerance_px`` of any pixel sharing the maximum.

    Exact: the distance from each pixel to R comes from ``cv2.distanceTransform`` (DIST_L2,
    DIST_MASK_PRECISE, an exact Euclidean transform), and as distances between pixel coordinates have
    integer squares, the comparison is done on the rounded square (exact for distances < 2048 px;
    beyond, to float32 precision). A distance of exactly 2 hits with tolerance 2 and misses with 1.9.
    All-zero heat: False.
    """
    return _pointing(heat, mask, tolerance_px)[0]


def iou_at(heat: np.ndarray, mask: np.ndarray, fraction: float = defaults.IOU_THRESHOLD) -> float:
    """IoU of the hot area {H >= fraction * max H} with R; 0.0 for an all-zero heatmap."""
    return _iou(heat, mask, fraction)[0]


def rank_accuracy(heat: np.ndarray, mask: np.ndarray) -> float:
    """Of the |R| hottest pixels, the share inside R; 0.0 for an all-zero heatmap.

    Pixels tied at the cut-off value share the places left after the hotter ones: each gets
    ``places / tied`` credit, the mean over every order of the ties (any fixed order, such as
    row-major, would let the position of R decide the score). Zero heat is never credited: with a
    single hot pixel outside R and everything else zero, the score is 0, not the share of zeros that
    happen to lie in R. O(n): a partition finds the cut, no sort.
    """
    heat, mask = _validate(heat, mask)
    if heat_is_empty(heat):
        return 0.0
    flat, inside = heat.ravel(), mask.ravel()
    k = int(inside.sum())
    cut = flat[np.argpartition(flat, flat.size - k)[flat.size - k]]  # the k-th largest value
    above = flat > cut
    hits = float(np.count_nonzero(above & inside))
    if cut > 0:
        places = k - int(above.sum())
        tied = flat == cut
        hits += places * np.count_nonzero(tied & inside) / np.count_nonzero(tied)
    return min(1.0, hits / k)


def auc(heat: np.ndarray, mask: np.ndarray) -> float:
    """ROC AUC of the heat as a score for "inside R": P(h_in > h_out) + P(h_in == h_out) / 2.

    The threshold-free localisation score of Quantus' ``AUC`` (``sklearn.metrics.roc_curve`` then
    ``auc``), computed exactly as the Mann-Whitney statistic from counts per distinct heat value: 1.0
    when every pixel of R is hotter than every pixel outside, 0.5 for a uniform map (chance), 0.0 when
    R holds the coldest pixels. 0.0 for an all-zero heatmap (nothing found, as the other metrics).
    Raises ``ValueError`` when R covers every pixel: with nothing outside R there is no curve
    (``check_focus`` reports that as a failed check with the reason).
    """
    heat, mask = _validate(heat, mask)
    if mask.all():
        raise ValueError("the region covers every pixel: AUC needs pixels outside it")
    if heat_is_empty(heat):
        return 0.0
    values, where = np.unique(heat.ravel(), return_inverse=True)
    inside = np.bincount(where.ravel(), weights=mask.ravel(), minlength=len(values))
    outside = np.bincount(where.ravel(), minlength=len(values)) - inside
    colder = np.cumsum(outside) - outside  # pixels outside R strictly colder than each value
    n_in, n_out = float(inside.sum()), float(outside.sum())
    pairs = float(np.dot(inside, colder + outside / 2.0))
    return min(1.0, max(0.0, pairs / (n_in * n_out)))


def _validate(heat: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heat = np.asarray(heat)
    mask = np.asarray(mask)
    if heat.ndim != 2:
        raise ValueError(f"heat must be a 2-D (h, w) array, got shape {heat.shape}")
    if heat.shape != mask.shape:
        raise ValueError(f"heat {heat.shape} and mask {mask.shape} differ in shape")
    if mask.dtype != bool:
        raise ValueError(f"mask must be a bool array, got {mask.dtype}")
    if not np.issubdtype(heat.dtype, np.number) or np.issubdtype(heat.dtype, np.complexfloating):
        raise ValueError(f"heat must be a real numeric array, got {heat.dtype}")
    if not np.all(np.isfinite(heat)):
        raise ValueError("heat contains NaN or infinite values")
    if heat.size and heat.min() < 0:
        raise ValueError(f"heat must be non-negative (after ReLU), min is {heat.min()}")
    if not mask.any():
        raise ValueError("mask is empty: regions.region_mask never returns an empty region")
    return heat, mask


def _pointing(heat: np.ndarray, mask: np.ndarray,
              tolerance_px: float) -> tuple[bool, tuple[int, int] | None, float, int]:
    """(hit, hottest pixel (x, y) nearest to R, its distance to R, number of pixels sharing the max)."""
    heat, mask = _validate(heat, mask)
    if not (math.isfinite(tolerance_px) and tolerance_px >= 0):
        raise ValueError(f"tolerance_px must be a finite number >= 0, got {tolerance_px}")
    if heat_is_empty(heat):
        return False, None, math.inf, 0
    peaks = heat == heat.max()
    n_peaks = int(peaks.sum())
    if n_peaks == heat.size:  # a uniform map: "any tied maximum may hit" would hit every region
        return False, None, math.inf, n_peaks
    on_target = np.argwhere(peaks & mask)
    if len(on_target):
        y, x = on_target[0]
        return True, (int(x), int(y)), 0.0, n_peaks
    import cv2

    dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ys, xs = np.nonzero(peaks)
    d = dist[ys, xs].astype(np.float64)
    i = int(np.argmin(d))
    nearest = float(d[i])
    squared = float(np.rint(nearest * nearest))
    hit = squared <= tolerance_px * tolerance_px if nearest < 2048 else nearest <= tolerance_px
    exact = math.sqrt(squared) if nearest < 2048 else nearest
    return bool(hit), (int(xs[i]), int(ys[i])), exact, n_peaks


def _iou(heat: np.ndarray, mask: np.ndarray, fraction: float) -> tuple[float, int]:
    """(IoU, size of the hot area)."""
    heat, mask = _validate(heat, mask)
    if not (0 < fraction <= 1):
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if heat_is_empty(heat):
        return 0.0, 0
    hot = heat >= fraction * heat.max()
    inter = int(np.count_nonzero(hot & mask))
    union = int(np.count_nonzero(hot | mask))
    return inter / union, int(np.count_nonzero(hot))


# -------------------------------------------------------------------------------------- focus check

@dataclass(frozen=True, eq=False)  # ndarray fields: element-wise == would make eq/hash raise
class FocusExpectation:
    """Where the heat should (``region``) and should not (``avoid``) be, with the thresholds to apply.

    Masks are bool (h, w) arrays of the original image (``regions.region_mask``); the ``*_desc`` texts
    name them in messages. ``target_desc`` names the class whose Grad-CAM is checked.
    """

    region: np.ndarray | None
    region_desc: str = ""
    min_energy: float | None = None
    pointing_game: bool = False
    tolerance_px: float = 0.0
    min_iou: float | None = None
    iou_threshold: float = defaults.IOU_THRESHOLD
    min_rank_accuracy: float | None = None
    min_auc: float | None = None
    avoid: np.ndarray | None = None
    avoid_desc: str = ""
    max_energy_in_avoid: float | None = None
    target_desc: str = ""


def check_focus(heat: np.ndarray, expectation: FocusExpectation,
                extra: Sequence[tuple[Metric, str]] = ()) -> CheckResult:
    """Compute every requested metric against its threshold; an all-zero heatmap fails them all.

    ``extra``: metrics measured elsewhere with their one-line reasons (the deletion/insertion curves of
    :mod:`audit.faithfulness`, which need the model), reported after the map's own metrics.
    """
    e = expectation
    wants_region = (e.min_energy is not None or e.pointing_game or e.min_iou is not None
                    or e.min_rank_accuracy is not None or e.min_auc is not None)
    if wants_region and e.region is None:
        raise ValueError("a focus metric on the region was requested but FocusExpectation.region is None")
    if e.max_energy_in_avoid is not None and e.avoid is None:
        raise ValueError("max_energy_in_avoid was given but FocusExpectation.avoid is None")
    if not wants_region and e.max_energy_in_avoid is None and not extra:
        raise ValueError("FocusExpectation requests no metric (the focus kind applies audit.defaults.MIN_ENERGY)")
    for mask in (e.region, e.avoid):
        if mask is not None:
            _validate(heat, mask)

    region = e.region_desc or "the expected region"
    avoid = e.avoid_desc or "the avoided region"
    target = e.target_desc or "the target class"
    empty = heat_is_empty(heat)
    rows: list[tuple[Metric, str]] = []

    if e.min_energy is not None:
        v = energy_inside(heat, e.region)
        m = Metric("energy_inside", v, float(e.min_energy), ">=", not empty and v >= e.min_energy)
        rows.append((m, f"{v:.0%} of the heat lies inside {region}; at least {e.min_energy:.0%} required"))

    if e.pointing_game:
        hit, peak, dist, n_peaks = _pointing(heat, e.region, float(e.tolerance_px))
        tol = f"tolerance {_fmt(float(e.tolerance_px))} px"
        if peak is None and n_peaks:
            why = (f"the heatmap is uniform (all {n_peaks} pixels share the maximum): it points "
                   f"nowhere, so it hits no region; {tol}")
        elif peak is None:
            why = f"no hottest point; {tol}"
        else:
            shared = f" ({n_peaks} pixels share the maximum)" if n_peaks > 1 else ""
            place = "inside" if dist == 0 else f"{dist:.1f} px from"
            why = f"the hottest point (x={peak[0]}, y={peak[1]}){shared} is {place} {region}; {tol}"
        rows.append((Metric("pointing_game", hit, True, "==", hit), why))

    if e.min_iou is not None:
        v, hot = _iou(heat, e.region, float(e.iou_threshold))
        name = f"iou@{_fmt(float(e.iou_threshold))}"
        why = (f"IoU of the hot area (heat >= {e.iou_threshold:.0%} of max, {hot} px) with {region} "
               f"({int(e.region.sum())} px) is {v:.2f}; at least {_fmt(float(e.min_iou))} required")
        rows.append((Metric(name, v, float(e.min_iou), ">=", not empty and v >= e.min_iou), why))

    if e.min_rank_accuracy is not None:
        v = rank_accuracy(heat, e.region)
        n = int(e.region.sum())
        why = (f"of the {n} hottest pixels, {v:.0%} lie inside {region}; "
               f"at least {e.min_rank_accuracy:.0%} required")
        rows.append((Metric("rank_accuracy", v, float(e.min_rank_accuracy), ">=",
                            not empty and v >= e.min_rank_accuracy), why))

    if e.min_auc is not None:
        floor = float(e.min_auc)
        if e.region.all():
            rows.append((Metric("auc", 0.0, floor, ">=", False),
                         f"{region} covers the whole image: AUC needs pixels outside it; use a smaller "
                         "region or another metric"))
        else:
            v = auc(heat, e.region)
            why = (f"a pixel inside {region} is hotter than one outside with probability {v:.2f} "
                   f"(ties count half; 0.50 is chance); at least {_fmt(floor)} required")
            rows.append((Metric("auc", v, floor, ">=", not empty and v >= floor), why))

    if e.max_energy_in_avoid is not None:
        v = energy_inside(heat, e.avoid)
        m = Metric("energy_in_avoid", v, float(e.max_energy_in_avoid), "<=",
                   not empty and v <= e.max_energy_in_avoid)
        rows.append((m, f"{v:.0%} of the heat lies inside {avoid}; at most {e.max_energy_in_avoid:.0%} allowed"))

    rows.extend((m, why) for m, why in extra)
    metrics = tuple(m for m, _ in rows)
    where = (f"focus of {target}" + (f" on {region}" if e.region is not None else "")
             + (f", avoiding {avoid}" if e.avoid is not None else ""))
    if empty:
        lines = [f"{where}: empty heatmap: Grad-CAM is zero everywhere for {target}",
                 f"  all {len(rows)} focus check{'s' if len(rows) != 1 else ''} fail: "
                 + ", ".join(m.name for m in metrics)]
        return CheckResult("focus", False, "\n".join(lines), metrics)
    failed = [(m, why) for m, why in rows if not m.passed]
    if not failed:
        return CheckResult("focus", True, f"{where}: " + ", ".join(str(m) for m in metrics), metrics)
    lines = [f"{where}: {len(failed)} of {len(rows)} focus checks failed"]
    for m, why in rows:
        lines.append(f"  {m}: {why}")
    return CheckResult("focus", False, "\n".join(lines), metrics)


# ------------------------------------------------------------------------------------------ formatting

def _plain(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, (bool, int)):
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) >= 1 else f"{v:.2f}"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _fmt_pair(value: float, threshold: float) -> tuple[str, str]:
    """Two decimals, more when needed so a failing 0.499 vs 0.5 never prints as "0.50 >= 0.50"."""
    if isinstance(value, int) and isinstance(threshold, int):
        return str(value), str(threshold)
    for digits in range(2, 8):
        a, b = f"{float(value):.{digits}f}", f"{float(threshold):.{digits}f}"
        if a != b or value == threshold:
            return a, b
    return repr(float(value)), repr(float(threshold))
