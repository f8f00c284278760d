"""The ``baseline`` check kind: today's observation against the one recorded before an upgrade.

The tolerances come from the ``baseline`` key (spec level, ``defaults`` and case, merged key by key);
the recording, storage and comparison live in :mod:`audit.baselines`. A case gets a ``::baseline`` item
when its spec has recorded baselines, or while recording (``--audit-update-baselines``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from audit import baselines, checks
from audit.baselines import BaselineTolerance
from audit.errors import AuditError
from audit.kinds.base import CheckKind, Needs, Picture


class NoBaseline(AuditError):
    """A case of a spec with baselines has none recorded yet: skipped (an error under --audit-strict)."""


@dataclass(eq=False)
class PreparedBaseline:
    tolerance: BaselineTolerance
    store: baselines.BaselineStore
    case_id: str
    updating: bool
    then: baselines.Baseline | None = None
    error: AuditError | None = None     # a corrupt recording fails this item only, not the case's others
    now: baselines.Baseline | None = None


class BaselineKind(CheckKind):
    name = "baseline"
    key = "baseline"
    schema = {"$ref": "#/$defs/baseline"}
    spec_level = True
    order = 30

    def parse(self, raw: Any, ctx: Any) -> BaselineTolerance:
        return BaselineTolerance(**(raw or {}))

    def applies(self, case: Any, run: Any) -> bool:
        return run.update_baselines or baselines.BaselineStore(case.spec_path).exists()

    def prepare(self, config: BaselineTolerance | None, case: Any, model: Any) -> PreparedBaseline:
        prepared = PreparedBaseline(config or BaselineTolerance(), baselines.BaselineStore(case.spec_path),
                                    case.id, model.run.update_baselines)
        if not prepared.updating:
            try:
                prepared.then = prepared.store.load(case.id)
            except AuditError as exc:
                prepared.error = exc
        return prepared

    def needs(self, prepared: PreparedBaseline) -> Needs:
        if prepared.then is None:
            return Needs()
        return Needs(targets=(int(prepared.then.target),))

    def _now(self, prepared: PreparedBaseline, observation: Any) -> baselines.Baseline:
        """Today's recording of the case (built once: it hashes the image file)."""
        if prepared.now is None:
            then = prepared.then
            prepared.now = baselines.Baseline.from_explanation(
                prepared.case_id, observation.explanation, observation.case.image, observation.fingerprint,
                observation.preprocess, target=then.target if then is not None else observation.subject)
        return prepared.now

    def check(self, prepared: PreparedBaseline, observation: Any) -> checks.CheckResult:
        if prepared.error is not None:
            raise prepared.error
        now = self._now(prepared, observation)
        if prepared.updating:
            paths = prepared.store.save(now)
            return checks.CheckResult("baseline", True, f"baseline recorded: {paths[0]}", ())
        if prepared.then is None:
            raise NoBaseline(f"no baseline for {prepared.case_id} in {prepared.store.folder}; "
                             f"record it with --audit-update-baselines")
        return baselines.compare(prepared.then, now, prepared.tolerance)

    def record(self, prepared: PreparedBaseline, observation: Any) -> dict | None:
        if prepared.then is None or prepared.error is not None:
            return None
        return baselines.deltas(prepared.then, self._now(prepared, observation))

    def pictures(self, prepared: PreparedBaseline, observation: Any) -> dict[str, Picture]:
        if prepared.then is None or prepared.error is not None:
            return {}
        return {"heatmap": Picture(heat=prepared.then.heatmap.astype(np.float32))}


KIND = BaselineKind()
