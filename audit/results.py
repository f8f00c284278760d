"""Results: what each check found, gathered from pytest's reports, for the terminal and the report.

Workers (or the single process of a serial run) attach a JSON record of the case and of each check to
the item's ``user_properties``; those travel inside pytest's own reports, also through pytest-xdist,
and the controller rebuilds the cases from the reports alone. One code path for serial and parallel
runs, and the controller never needs the model, the images or torch.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CASE_PROP = "model_audit_case"
CHECK_PROP = "model_audit_check"
_ORDER = {"error": 3, "failed": 2, "skipped": 1, "passed": 0}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    return {"torch": version("torch"), "torchvision": version("torchvision"),
            "model_audit": version("model-audit"), "python": platform.python_version()}


class ResultCollector:
    """Controller side: cases rebuilt from reports; worker side: records attached to items."""

    def __init__(self, report_dir: Path | None, self_contained: bool = False, colormap: str = "jet",
                 run_id: str | None = None, is_worker: bool = False, device: str = "cpu"):
        self.device = device
        self.report_dir = report_dir
        self.self_contained = self_contained
        self.colormap = colormap
        self.run_id = run_id
        self.is_worker = is_worker
        self.started = time.time()
        self.cases: dict[str, dict] = {}
        self.stats: dict[str, float] = {}
        self.models: dict[str, dict] = {}
        self.skip_reasons: dict[str, int] = {}
        self.report_path: Path | None = None
        self.report_error: str | None = None
        self.asset_error: str | None = None   # a picture could not be written (here or on a worker)
        self._case_json: dict[str, str] = {}

    # -- session start (controller) ----------------------------------------------------------------
    def start(self) -> None:
        """Prove the report folder is writable before any model runs, and open this run's asset folder."""
        from audit import report

        report.check_writable(self.report_dir)
        self.run_id, _ = report.new_run_dir(self.report_dir)
        report.warm_up()

    @property
    def asset_dir(self) -> Path | None:
        if self.report_dir is None or self.run_id is None:
            return None
        return self.report_dir / "assets" / self.run_id

    # -- records attached to items (any process) --------------------------------------------------
    def note_case(self, item: Any, observation: Any, audit: Any, error: str | None = None) -> None:
        """Attach the case record (built and drawn once per case per process) to this item."""
        nodeid = item.ref.nodeid
        if nodeid not in self._case_json or error:
            record = self._case_record(item.ref, observation, audit, error)
            self._case_json[nodeid] = json.dumps(record)
        item.user_properties.append((CASE_PROP, self._case_json[nodeid]))

    def note_check(self, item: Any, result: Any) -> None:
        item.user_properties.append((CHECK_PROP, json.dumps(result.to_dict())))

    def note_broken(self, item: Any, message: str) -> None:
        record = {"nodeid": item.nodeid, "spec": str(item.path), "line": getattr(item.error, "line", None),
                  "case_id": "(invalid spec)", "model": None, "image": None, "image_size": None,
                  "top_k": [], "target": None, "checks": [], "regions": {}, "seen_box": None, "crops": False,
                  "assets": {}, "baseline": None, "error": message, "features": []}
        item.user_properties.append((CASE_PROP, json.dumps(record)))

    def _case_record(self, ref: Any, observation: Any, audit: Any, error: str | None) -> dict:
        from audit.session import model_label

        case = ref.case
        record: dict[str, Any] = {
            "nodeid": ref.nodeid, "spec": str(ref.spec.path), "line": case.location.line, "case_id": case.id,
            "model": model_label(ref.model), "image": str(case.image), "image_size": None, "top_k": [],
            "target": None, "checks": [], "regions": {"region": None, "avoid": None}, "seen_box": None,
            "crops": False, "assets": {}, "baseline": None, "error": error, "features": []}
        if observation is None:
            return record
        from audit import regions
        from audit.session import heat_for_report

        prepared, e = observation.prepared, observation.explanation
        engine = audit.engine(ref.model)
        focus = case.focus
        target = observation.target
        record.update(
            image_size=list(e.image_size),
            top_k=[{"index": r.index, "label": r.label, "prob": r.prob, "expected": r.index in prepared.expected_labels}
                   for r in e.top_k[:max(case.top_k, 5)]],
            target={"index": target, "label": engine.label(target)},
            regions={"region": regions.describe(list(focus.region)) if focus and focus.region else None,
                     "avoid": regions.describe(list(focus.avoid)) if focus and focus.avoid else None},
            seen_box=list(e.geometry.seen_box), crops=bool(e.geometry.crops),
            features=[{"layer": f.layer, "shape": list(e.features[f.layer].shape),
                       "shown": min(f.max_channels or _default_channels(f.layer, e), e.features[f.layer].shape[0])}
                      for f in case.features],
            observe_s=observation.seconds)
        baseline_heat = None
        if prepared.baseline_then is not None:
            from audit.baselines import deltas

            record["baseline"] = deltas(prepared.baseline_then, audit.baseline_now(observation))
            baseline_heat = prepared.baseline_then.heatmap.astype(np.float32)
        if self.asset_dir is not None:
            from audit import report

            record["assets"] = report.render_case_assets(
                self.asset_dir, ref.nodeid, prepared.image, heat_for_report(observation),
                prepared.region_outlines, prepared.avoid_outlines, e.geometry.seen_box,
                {f.layer: e.features[f.layer] for f in case.features},
                {f.layer: f.max_channels or _default_channels(f.layer, e) for f in case.features},
                colormap=self.colormap, baseline_heat=baseline_heat)
        return record

    # -- controller: rebuild from reports --------------------------------------------------------
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        if CASE_PROP not in props:
            # A spec item's report without our record: a worker died while running it (xdist's crash
            # report) or something outside our hooks failed. pytest counts it, so the report must too.
            placeholder = _placeholder_case(report)
            if placeholder is None or (report.passed and report.when != "call"):
                return
            props = {CASE_PROP: json.dumps(placeholder)}
        case = _case_from_json(props[CASE_PROP])
        stored = self.cases.setdefault(case["nodeid"], {**case, "checks": []})
        if stored.get("placeholder") and not case.get("placeholder"):   # the real record arrived
            stored.update({k: v for k, v in case.items() if k != "checks"})
            stored.pop("placeholder", None)
        if case.get("assets") and not stored.get("assets"):
            stored.update({k: v for k, v in case.items() if k != "checks"})
        if case.get("error") and not stored.get("error"):
            stored["error"] = case["error"]
        kind = report.nodeid.rsplit("::", 1)[-1]
        if report.when == "setup" and report.outcome == "passed":
            return
        if report.when == "teardown" and report.outcome == "passed":
            return
        check = json.loads(props[CHECK_PROP]) if CHECK_PROP in props else {"kind": kind, "metrics": []}
        outcome = report.outcome if report.when == "call" else ("skipped" if report.skipped else "error")
        if report.when not in ("setup", "call", "teardown"):   # xdist's crash report says when="???"
            outcome = "failed"   # as pytest counts it
        message = check.get("message") or _longrepr_text(report)
        if report.skipped:
            reason = _skip_reason(report)
            message = reason
            self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1
        stored["checks"].append({"kind": check.get("kind", kind), "outcome": outcome, "message": message,
                                 "metrics": check.get("metrics", []), "duration_s": report.duration,
                                 "nodeid": report.nodeid})

    def add_stats(self, payload: dict) -> None:
        for name, value in payload.get("stats", {}).items():
            self.stats[name] = self.stats.get(name, 0) + value
        self.models.update(payload.get("models", {}))
        self.asset_error = self.asset_error or payload.get("asset_error")

    def counts(self) -> dict[str, int]:
        counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
        for case in self.cases.values():
            for check in case["checks"]:
                counts[check["outcome"]] += 1
        return counts

    def case_list(self) -> list[dict]:
        cases = []
        for case in self.cases.values():
            outcomes = [c["outcome"] for c in case["checks"]] or ["error" if case.get("error") else "skipped"]
            cases.append({**case, "outcome": max(outcomes, key=_ORDER.__getitem__)})
        return cases

    def finish(self, config: pytest.Config, session: pytest.Session) -> None:
        """Write results.json and the HTML report (controller only); a failure here never hides results."""
        if self.report_dir is None:
            return
        from audit import report

        if self.asset_error:   # the page would show holes: keep the previous report, free the space
            report.discard_run(self.report_dir, self.run_id)
            self.report_error = f"its pictures could not be written: {self.asset_error}"
            return
        run = {"started": dt.datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
               "duration_s": round(time.time() - self.started, 3), "models": list(self.models.values()),
               "versions": _versions(), "counts": self.counts(), "args": list(config.invocation_params.args),
               "device": self.device,
               "stats": self.stats}
        try:
            self.report_path = report.write_report(self.report_dir, run, self.case_list(), self.run_id,
                                                   self_contained=self.self_contained)
        except Exception as exc:  # the test outcomes stand; the report problem is said once, loudly
            self.report_error = f"{type(exc).__name__}: {exc}"

    # -- terminal -------------------------------------------------------------------------------------
    def summary_lines(self) -> list[str]:
        lines = []
        if self.cases:
            counts = self.counts()
            s = self.stats
            lines.append(f"model-audit: {len(self.cases)} cases; checks: {counts['passed']} passed, "
                         f"{counts['failed']} failed, {counts['error']} errors, {counts['skipped']} skipped; "
                         f"{int(s.get('model_loads', 0))} model loads, {int(s.get('images', 0))} images in "
                         f"{int(s.get('forward_passes', 0))} forward passes")
        for reason, n in self.skip_reasons.items():
            lines.append(f"model-audit: {n} checks did not run: {reason} "
                         f"(use --audit-strict to make this an error)")
        if self.report_path is not None:
            lines.append(f"model-audit report: {self.report_path}")
        if self.report_error:
            lines.append(f"model-audit: the report could not be written ({self.report_error}); "
                         f"the previous report was left in place")
        return lines


@functools.lru_cache(maxsize=64)
def _case_from_json(text: str) -> dict:
    """A case record, parsed once: the setup, call and teardown reports of each check all carry it.

    Callers copy before they change anything (``{**case, ...}``); the cache's dicts stay as parsed.
    """
    return json.loads(text)


def _placeholder_case(report: pytest.TestReport) -> dict | None:
    """A minimal case record for a spec item whose report carries none (its worker crashed); None for
    any other item. A real record of the case, from another check of it, replaces it when it comes."""
    spec, _, rest = report.nodeid.partition("::")
    if not spec.endswith((".yaml", ".yml")) or rest.count("::") < 1:
        return None
    case_id = rest.rsplit("::", 1)[0]
    return {"nodeid": f"{spec}::{case_id}", "spec": spec, "line": None, "case_id": case_id, "model": None,
            "image": None, "image_size": None, "top_k": [], "target": None, "checks": [],
            "regions": {"region": None, "avoid": None}, "seen_box": None, "crops": False, "assets": {},
            "baseline": None, "error": None, "features": [], "placeholder": True}


def _default_channels(layer: str, explanation: Any) -> int:
    """The classic notebook's grids: all 64 maps of an early layer, the first 72 of a deep one."""
    channels = explanation.features[layer].shape[0]
    return channels if channels <= 64 else 72


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    return reason.removeprefix("Skipped: ").removeprefix("model-audit: ")


def _longrepr_text(report: pytest.TestReport) -> str:
    return str(report.longreprtext or "").strip()
