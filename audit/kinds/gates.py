"""The ``gates`` check kind (top-level spec key ``gates``): set-level verdicts over every case of a spec.

One ``spec.yaml::gates`` item per spec, run after the spec's cases (also under pytest-xdist: see
:mod:`audit.setrecords`). The numbers are pure functions in :mod:`audit.gates`; this module reads the
cases' outcomes, compares them with the set-level numbers recorded by ``--audit-update-baselines``
(``baselines/<spec>/@gates.json``: ``@`` is no character of a case's baseline file name) and turns the
result into a ``CheckResult`` whose failure message carries the per-class table.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

from audit import gates as G
from audit.baselines import BaselineStore
from audit.checks import CheckResult
from audit.errors import AuditError
from audit.kinds.base import CheckKind
from audit.kinds.baseline import NoBaseline

_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}

SCHEMA = {
    "description": "Set-level gates over every case of this spec (one spec.yaml::gates item, run after "
                   "the cases).",
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {
        "min_top1_accuracy": {**_FRACTION, "description": "share of cases whose top-1 is their label "
                                                          "(expect.top1_is_label, else expect.top1); "
                                                          "errored cases count as wrong"},
        "min_per_class_recall": {**_FRACTION, "description": "the lowest per-class top-1 recall"},
        "min_pointing_game_rate": {**_FRACTION, "description": "share of the cases with a pointing game "
                                                               "whose hottest point hits the region"},
        "min_median_energy": {**_FRACTION, "description": "median share of heat inside the region"},
        "baseline": {
            "description": "compared with the set-level numbers recorded by --audit-update-baselines",
            "type": "object", "additionalProperties": False, "minProperties": 1,
            "properties": {
                "max_accuracy_drop": {**_FRACTION, "description": "top-1 accuracy may fall by at most this"},
                "max_class_recall_drop": {**_FRACTION, "description": "no class's recall may fall by more"},
            },
        },
    },
}

BASELINE_FILE = "@gates.json"


class NotGated(AuditError):
    """The gates cannot be decided in this run: the item is skipped with this reason."""


class ShardedRun(NotGated):
    """A ``--audit-shard`` run holds part of each set: its gates are decided by ``model-audit merge``."""


class GatesKind(CheckKind):
    name = "gates"
    key = "gates"
    schema = SCHEMA
    scope = "spec"
    order = 90

    def parse(self, raw: Any, ctx: Any) -> G.Gates | None:
        return G.Gates.from_raw(raw) if raw else None

    def applies_to_spec(self, spec: Any, run: Any) -> bool:
        return spec.checks.get(self.name) is not None

    def check_spec(self, spec: Any, session: Any) -> CheckResult:
        gates: G.Gates = spec.checks[self.name]
        shard = getattr(session, "shard", None)
        if shard is not None and shard.count > 1:
            raise ShardedRun(f"shard {shard} holds part of the set; the gates are decided over every shard "
                             f"by model-audit merge")
        results = getattr(session, "case_results", None)
        if results is None:   # pragma: no cover - the plugin always attaches it
            raise AuditError("gates need the case results of the run (model-audit plugin not configured)")
        cases, missing = results.for_spec(spec.path)
        if not cases and not missing:
            raise NotGated("no case of this spec was selected (-k, -m or --lf left them out): nothing to gate")
        if missing:
            shown = ", ".join(m.split("::")[-1] for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise AuditError(f"gates: {len(missing)} cases of this spec have not reported ({shown}): the gates "
                             f"item ran before them or they ran elsewhere (use -n with the default --dist "
                             f"load, or --dist loadfile)")
        metrics = G.set_metrics(outcomes(spec, cases))
        store = BaselineStore(spec.path)
        path = store.folder / BASELINE_FILE
        if getattr(session, "update_baselines", False):
            from audit.files import atomic_write_bytes

            store.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, (json.dumps({"schema_version": 1, "metrics": metrics.to_dict()},
                                                 indent=2, sort_keys=True) + "\n").encode())
            result = G.evaluate_gates(metrics, gates)
            return CheckResult("gates", result.passed, f"set-level numbers recorded: {path}\n{result.message}",
                               result.metrics)
        baseline = None
        if gates.uses_baseline:
            baseline = load_baseline(path)
            if baseline is None:
                raise NoBaseline(f"no set-level baseline {path}; record it with --audit-update-baselines")
        return G.evaluate_gates(metrics, gates, baseline)


def outcomes(spec: Any, cases: Iterable[dict]) -> list[G.CaseOutcome]:
    """The gate outcome of each case that ran; labels come from the spec (dataset cases carry theirs)."""
    labels = {c.id: (c.label if c.label is not None else _expected_top1(c)) for c in spec.cases}
    found = []
    for case in cases:
        record = case["record"] if isinstance(case.get("record"), dict) else case
        outcome = G.outcome_of(case, labels.get(record.get("case_id")))
        if outcome is not None:
            found.append(outcome)
    return found


def _expected_top1(case: Any) -> str | None:
    expect = case.checks.get("prediction") if case.checks else None
    top1 = getattr(expect, "top1", None)
    return str(top1) if top1 is not None else None


def load_baseline(path) -> G.SetMetrics | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AuditError(f"set-level baseline {path} cannot be used ({exc}); delete it and re-record with "
                         f"--audit-update-baselines") from None
    try:
        return G.SetMetrics.from_dict(raw["metrics"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditError(f"set-level baseline {path} cannot be used (missing {exc}); delete it and re-record "
                         f"with --audit-update-baselines") from None


KIND = GatesKind()
