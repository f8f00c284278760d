"""The ``baseline`` check kind: today's observation against the one recorded before an upgrade.

The tolerances come from the ``baseline`` key (spec level, ``defaults`` and case, merged key by key);
the recording, storage and comparison live in :mod:`audit.baselines`. The contract is syrupy's and
pytest-regressions': a case gets a ``::baseline`` item when its spec declares ``baseline:`` tolerances,
has any recording, while recording (``--audit-update-baselines``), and always under ``--audit-strict``;
a missing recording is never a pass (skipped, an error under ``--audit-strict``); recording leaves an
unchanged baseline byte-identical, and the end of the run says what was recorded, what was unchanged
and which recordings no case uses any more.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from audit import baselines, checks
from audit.baselines import BaselineTolerance
from audit.errors import AuditError
from audit.kinds.base import CheckKind, Needs, NotRecorded, Picture


class NoBaseline(NotRecorded):
    """A case without a recording in a spec that has (or needs) baselines."""


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

    def parse(self, raw: Any, ctx: Any) -> BaselineTolerance | None:
        """The tolerances, or None when the spec declares none (defaults apply to recorded baselines)."""
        return BaselineTolerance(**raw) if raw else None

    def applies(self, case: Any, run: Any) -> bool:
        return (run.update_baselines or run.strict or case.checks.get(self.name) is not None
                or baselines.BaselineStore(case.spec_path).exists())

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

    def ready(self, prepared: PreparedBaseline, observation: Any) -> None:
        if not prepared.updating and prepared.then is None and prepared.error is None:
            raise NoBaseline(f"no baseline for {prepared.case_id} in {prepared.store.folder}; "
                             f"record it with --audit-update-baselines")

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
            written = prepared.store.save(now)
            state = "recorded" if written.changed else "unchanged"
            return checks.CheckResult("baseline", True, f"baseline {state}: {written.paths[0]}", (),
                                      data={"baseline": state, "file": str(written.paths[0])})
        if prepared.then is None:   # ready() said so at setup; kept for direct callers
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

    def summary(self, results: list[Any], specs: list[Any], run: Any) -> list[str]:
        """"N baselines recorded, M unchanged, K unused", and the unused files (removed on request)."""
        states = [str((r.get("data") or {}).get("baseline")) for r in results]
        unused = [path for spec in specs for path in baselines.BaselineStore(spec.path).unused(c.id for c in spec.cases)]
        if not run.update_baselines and not unused:
            return []
        if run.remove_unused_baselines:
            for path in unused:
                path.unlink(missing_ok=True)
        counts = (f"{states.count('recorded')} recorded, {states.count('unchanged')} unchanged"
                  if run.update_baselines else "")
        what = "removed" if run.remove_unused_baselines else "unused"
        head = ", ".join(p for p in (counts, f"{len(unused)} {what}") if p)
        lines = [f"model-audit baselines: {head}"]
        lines += [f"  {what}: {path}" for path in unused[:20]]
        if len(unused) > 20:
            lines.append(f"  ... and {len(unused) - 20} more")
        if unused and not run.remove_unused_baselines:
            lines.append("  (their cases are gone from the specs; --audit-remove-unused-baselines deletes them)")
        return lines


KIND = BaselineKind()
