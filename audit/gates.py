"""Set-level gates over a golden set: accuracy, per-class recall, pointing game, energy (numpy only).

A team's regression gate is about the set, not one image: "top-1 accuracy >= 0.95, no class below
0.9 recall, the pointing game holds on >= 85% of the annotated cases, and no class lost more than 5
points since the baseline". These are pure functions over one :class:`CaseOutcome` per case, so the
same numbers come out of one run, of an xdist run whose records were gathered on the controller, and
of ``model-audit merge`` over the ``results.json`` of shards.

Counting rules (stated because each changes the numbers):

* An errored case (its image would not load, its label does not resolve) counts as a wrong top-1 and
  as a pointing miss when a pointing game was asked of it: a broken golden image never raises the
  accuracy. It is counted in ``errored`` and named in the message.
* Pointing-game rate and median energy are over the cases that measured them (a case whose spec
  asked for no pointing game is not a miss); a gate on a quantity no case measured fails, saying so.
* Comparisons allow 1e-9 of float slack, so 19/20 meets 0.95 and 0.97 - 0.95 meets a 0.02 drop.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from audit.checks import CheckResult, Metric

EPS = 1e-9

GATE_KEYS = ("min_top1_accuracy", "min_per_class_recall", "min_pointing_game_rate", "min_median_energy")
BASELINE_KEYS = ("max_accuracy_drop", "max_class_recall_drop")


@dataclass(frozen=True)
class CaseOutcome:
    """What a gate needs of one case's record.

    ``label`` is the dataset class (per-class numbers are keyed by it); ``predicted`` the model's
    top-1 label (None when the case errored); ``correct`` whether the top-1 is one of the label's model
    labels; ``pointing_hit``/``energy`` None when the case did not measure them.
    """

    case_id: str
    label: str
    predicted: str | None
    correct: bool | None
    pointing_hit: bool | None = None
    energy: float | None = None
    errored: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "CaseOutcome":
        return cls(**{f.name: raw.get(f.name, f.default) for f in fields(cls)})


@dataclass(frozen=True)
class ClassStats:
    """One class's row of the per-class table."""

    label: str
    n: int
    correct: int
    pointing_n: int = 0
    pointing_hits: int = 0
    median_energy: float | None = None

    @property
    def recall(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def pointing_rate(self) -> float | None:
        return self.pointing_hits / self.pointing_n if self.pointing_n else None


@dataclass(frozen=True)
class SetMetrics:
    """The set-level numbers of one run (or of merged shards); JSON round-trips through to_dict."""

    n: int
    correct: int
    errored: int
    per_class: Mapping[str, ClassStats] = field(default_factory=dict)
    pointing_n: int = 0
    pointing_hits: int = 0
    energy_n: int = 0
    median_energy: float | None = None
    errored_ids: tuple[str, ...] = ()

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def pointing_rate(self) -> float | None:
        return self.pointing_hits / self.pointing_n if self.pointing_n else None

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "correct": self.correct, "errored": self.errored,
                "accuracy": self.accuracy, "pointing_n": self.pointing_n,
                "pointing_hits": self.pointing_hits, "pointing_rate": self.pointing_rate,
                "energy_n": self.energy_n, "median_energy": self.median_energy,
                "errored_ids": list(self.errored_ids),
                "per_class": {label: {"n": s.n, "correct": s.correct, "recall": s.recall,
                                      "pointing_n": s.pointing_n, "pointing_hits": s.pointing_hits,
                                      "median_energy": s.median_energy}
                              for label, s in self.per_class.items()}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SetMetrics":
        per_class = {label: ClassStats(label, int(s["n"]), int(s["correct"]), int(s.get("pointing_n", 0)),
                                       int(s.get("pointing_hits", 0)), s.get("median_energy"))
                     for label, s in raw.get("per_class", {}).items()}
        return cls(n=int(raw["n"]), correct=int(raw["correct"]), errored=int(raw.get("errored", 0)),
                   per_class=per_class, pointing_n=int(raw.get("pointing_n", 0)),
                   pointing_hits=int(raw.get("pointing_hits", 0)), energy_n=int(raw.get("energy_n", 0)),
                   median_energy=raw.get("median_energy"),
                   errored_ids=tuple(raw.get("errored_ids", ())))


def outcome_of(case: Mapping[str, Any], label: str | None) -> CaseOutcome | None:
    """A case's outcome from its record and its checks (``{"record": ..., "checks": [{kind, outcome,
    metrics}]}``, the shape results.json and :mod:`audit.setrecords` hold); None for a case that did
    not run at all (every check skipped: model unavailable, deselected baseline).

    Top-1 correctness is the ``top1_is_label`` metric (else ``top1``) of its prediction check; pointing
    and energy are the focus check's ``pointing_game`` and ``energy_inside``.
    """
    record = case["record"] if isinstance(case.get("record"), dict) else case
    checks = list(case["checks"].values()) if isinstance(case.get("checks"), dict) else list(case.get("checks") or [])
    if checks and all(c.get("outcome") == "skipped" for c in checks):
        return None
    errored = bool(record.get("error")) or any(c.get("outcome") == "error" for c in checks)
    metrics = {m.get("name"): m for c in checks for m in c.get("metrics") or []}
    top_k = record.get("top_k") or []
    predicted = top_k[0].get("label") if top_k and not errored else None
    top1 = metrics.get("top1_is_label") or metrics.get("top1")
    correct = False if errored else (bool(top1["passed"]) if top1 is not None else None)
    has_focus = any(c.get("kind") == "focus" for c in checks)
    point = metrics.get("pointing_game")
    hit = (False if errored and has_focus else None) if point is None else bool(point["value"])
    energy = metrics.get("energy_inside")
    return CaseOutcome(case_id=str(record.get("case_id")), label=str(label) if label is not None else "(no label)",
                       predicted=predicted, correct=correct, pointing_hit=hit,
                       energy=None if energy is None or errored else float(energy["value"]), errored=errored)


def set_metrics(outcomes: Iterable[CaseOutcome]) -> SetMetrics:
    """Aggregate the outcomes; classes in name order, so shards merged in any order give one result."""
    outcomes = list(outcomes)
    by_class: dict[str, list[CaseOutcome]] = {}
    for o in outcomes:
        by_class.setdefault(o.label, []).append(o)
    judged = [o for o in outcomes if o.correct is not None]   # cases with a top-1 expectation
    per_class = {}
    for label, items in sorted(by_class.items()):
        points = [o.pointing_hit for o in items if o.pointing_hit is not None]
        energies = [o.energy for o in items if o.energy is not None]
        top1 = [o for o in items if o.correct is not None]
        per_class[label] = ClassStats(label, len(top1), sum(bool(o.correct) for o in top1), len(points),
                                      sum(bool(p) for p in points), _median(energies))
    points = [o.pointing_hit for o in outcomes if o.pointing_hit is not None]
    energies = [o.energy for o in outcomes if o.energy is not None]
    return SetMetrics(n=len(judged), correct=sum(bool(o.correct) for o in judged),
                      errored=sum(bool(o.errored) for o in outcomes), per_class=per_class,
                      pointing_n=len(points), pointing_hits=sum(bool(p) for p in points),
                      energy_n=len(energies), median_energy=_median(energies),
                      errored_ids=tuple(o.case_id for o in outcomes if o.errored))


def confusion(outcomes: Iterable[CaseOutcome]) -> dict[str, dict[str, int]]:
    """``{dataset class: {predicted top-1 (or "error"): count}}`` for the report's confusion matrix."""
    table: dict[str, dict[str, int]] = {}
    for o in outcomes:
        row = table.setdefault(o.label, {})
        key = o.predicted if o.predicted is not None else "error"
        row[key] = row.get(key, 0) + 1
    return table


def _median(values: Sequence[float]) -> float | None:
    return float(np.median(np.asarray(values, dtype=np.float64))) if len(values) else None


@dataclass(frozen=True)
class Gates:
    """The ``gates:`` block of a spec; every threshold optional, None = not gated."""

    min_top1_accuracy: float | None = None
    min_per_class_recall: float | None = None
    min_pointing_game_rate: float | None = None
    min_median_energy: float | None = None
    max_accuracy_drop: float | None = None
    max_class_recall_drop: float | None = None

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> "Gates":
        """From the spec's mapping (schema-validated: numbers in [0, 1]); ``baseline:`` nests the drops."""
        values = {k: raw.get(k) for k in GATE_KEYS}
        baseline = raw.get("baseline") or {}
        values.update({k: baseline.get(k) for k in BASELINE_KEYS})
        return cls(**{k: (float(v) if v is not None else None) for k, v in values.items()})

    @property
    def uses_baseline(self) -> bool:
        return self.max_accuracy_drop is not None or self.max_class_recall_drop is not None

    def count(self, with_baseline: bool) -> int:
        keys = GATE_KEYS + (BASELINE_KEYS if with_baseline else ())
        return sum(getattr(self, k) is not None for k in keys)


def evaluate_gates(metrics: SetMetrics, gates: Gates, baseline: SetMetrics | None = None) -> CheckResult:
    """One ``CheckResult("gates")``: a metric per gate set, the per-class table when any fails.

    The baseline gates are evaluated only when ``baseline`` is given (the caller decides what a
    missing baseline means: skip under a normal run, error under ``--audit-strict``).
    """
    results: list[tuple[Metric, str]] = []
    if metrics.n == 0 and metrics.pointing_n == 0 and metrics.energy_n == 0:
        return CheckResult("gates", False, "gates: no case of this spec ran, so there is nothing to gate")
    if metrics.n == 0 and (gates.min_top1_accuracy is not None or gates.min_per_class_recall is not None
                           or gates.uses_baseline):
        results.append(_unmeasured("top1_accuracy", gates.min_top1_accuracy or 0.0,
                                   "no case checked its top-1 (defaults: expect: {top1_is_label: true})"))
    elif gates.min_top1_accuracy is not None:
        results.append(_at_least("top1_accuracy", metrics.accuracy, gates.min_top1_accuracy,
                                 f"{metrics.correct} of {metrics.n} cases have the label as top-1"
                                 + (f" ({metrics.errored} errored, counted wrong)" if metrics.errored else "")))
    if gates.min_per_class_recall is not None and metrics.n:
        judged = [s for s in metrics.per_class.values() if s.n]
        worst = min(judged, key=lambda s: (s.recall, s.label))
        below = [s.label for s in judged if s.recall < gates.min_per_class_recall - EPS]
        reason = (f"lowest: {worst.label!r} {worst.correct}/{worst.n}"
                  + (f"; below the floor: {', '.join(repr(b) for b in below)}" if below else ""))
        results.append(_at_least("min_class_recall", worst.recall, gates.min_per_class_recall, reason))
    if gates.min_pointing_game_rate is not None:
        if metrics.pointing_rate is None:
            results.append(_unmeasured("pointing_game_rate", gates.min_pointing_game_rate,
                                       "no case measured the pointing game (focus: {pointing_game: true})"))
        else:
            results.append(_at_least("pointing_game_rate", metrics.pointing_rate, gates.min_pointing_game_rate,
                                     f"{metrics.pointing_hits} of {metrics.pointing_n} hottest points "
                                     f"inside the annotation"))
    if gates.min_median_energy is not None:
        if metrics.median_energy is None:
            results.append(_unmeasured("median_energy", gates.min_median_energy,
                                       "no case measured the energy inside a region (focus: {min_energy: ...})"))
        else:
            results.append(_at_least("median_energy", metrics.median_energy, gates.min_median_energy,
                                     f"median share of heat inside the annotation over {metrics.energy_n} cases"))
    if baseline is not None and metrics.n:
        if gates.max_accuracy_drop is not None:
            drop = baseline.accuracy - metrics.accuracy
            results.append(_at_most("accuracy_drop", drop, gates.max_accuracy_drop,
                                    f"top-1 accuracy {baseline.accuracy:.3f} at the baseline, "
                                    f"{metrics.accuracy:.3f} now"))
        if gates.max_class_recall_drop is not None:
            drops = {label: baseline.per_class[label].recall - s.recall
                     for label, s in metrics.per_class.items()
                     if s.n and label in baseline.per_class and baseline.per_class[label].n}
            if drops:
                label = max(drops, key=lambda k: (drops[k], k))
                results.append(_at_most("max_class_recall_drop", drops[label], gates.max_class_recall_drop,
                                        f"largest: {label!r} {baseline.per_class[label].recall:.3f} at the "
                                        f"baseline, {metrics.per_class[label].recall:.3f} now"))
            else:
                results.append(_unmeasured("max_class_recall_drop", gates.max_class_recall_drop,
                                           "no class of this run is in the baseline", op="<="))
    if not results:
        return CheckResult("gates", False, "gates: no gate is set (min_top1_accuracy, "
                                           "min_per_class_recall, min_pointing_game_rate, min_median_energy)")
    failed = [(m, r) for m, r in results if not m.passed]
    metric_tuple = tuple(m for m, _ in results)
    total = max(metrics.n, metrics.pointing_n, metrics.energy_n)
    scope = f"{total} cases" + (f", {metrics.errored} errored" if metrics.errored else "")
    if not failed:
        return CheckResult("gates", True, f"gates: all {len(results)} met over {scope}: "
                           + ", ".join(str(m) for m in metric_tuple), metric_tuple)
    lines = [f"gates: {len(failed)} of {len(results)} gates failed over {scope}"]
    lines += [f"  {m}: {reason}" for m, reason in results]
    lines += class_table(metrics, baseline)
    if metrics.errored_ids:
        shown = ", ".join(metrics.errored_ids[:5]) + (", ..." if len(metrics.errored_ids) > 5 else "")
        lines.append(f"  errored cases: {shown}")
    return CheckResult("gates", False, "\n".join(lines), metric_tuple)


def class_table(metrics: SetMetrics, baseline: SetMetrics | None = None) -> list[str]:
    """The per-class table of a failure message, worst recall first."""
    rows = sorted(metrics.per_class.values(), key=lambda s: (s.recall if s.n else 2.0, s.label))
    width = max([len("class")] + [len(s.label) for s in rows])
    head = f"  {'class':<{width}}  {'n':>5}  {'recall':>6}  {'pointing':>8}  {'energy':>6}"
    if baseline is not None:
        head += f"  {'recall then':>11}"
    out = [head]
    for s in rows:
        point = f"{s.pointing_rate:.3f}" if s.pointing_rate is not None else "-"
        energy = f"{s.median_energy:.3f}" if s.median_energy is not None else "-"
        recall = f"{s.recall:.3f}" if s.n else "-"
        line = f"  {s.label:<{width}}  {s.n:>5}  {recall:>6}  {point:>8}  {energy:>6}"
        if baseline is not None:
            then = baseline.per_class.get(s.label)
            line += f"  {(f'{then.recall:.3f}' if then else 'new'):>11}"
        out.append(line)
    return out


def _at_least(name: str, value: float, threshold: float, reason: str) -> tuple[Metric, str]:
    return Metric(name, float(value), float(threshold), ">=", bool(value >= threshold - EPS)), reason


def _at_most(name: str, value: float, threshold: float, reason: str) -> tuple[Metric, str]:
    return Metric(name, float(value), float(threshold), "<=", bool(value <= threshold + EPS)), reason


def _unmeasured(name: str, threshold: float, reason: str, op: str = ">=") -> tuple[Metric, str]:
    """A gate on a quantity nothing measured: failed, value 0 (JSON has no NaN), the reason says why."""
    return Metric(name, 0.0, float(threshold), op, False), reason
