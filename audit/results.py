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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from audit import records
from audit.versions import library_versions

from audit.outcomes import CASE_PROP, CHECK_PROP, records_of  # noqa: E402  (records ride on reports)
_ORDER = {"error": 5, "failed": 4, "xpassed": 3, "skipped": 2, "xfailed": 1, "passed": 0}
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


class ResultCollector:
    """Controller side: cases rebuilt from reports; worker side: records attached to items."""

    def __init__(self, report_dir: Path | None, self_contained: bool = False, colormap: str = "jet",
                 run_id: str | None = None, is_worker: bool = False, device: str = "cpu", session: Any = None):
        self.session = session
        self.kept_report = False
        self.device = device
        self.report_dir = report_dir
        self.self_contained = self_contained
        self.colormap = colormap
        self.run_id = run_id
        self.is_worker = is_worker
        self.started = time.time()
        self.cases = CaseStore()
        self.stats: dict[str, float] = {}
        self.models: dict[str, dict] = {}
        self.skip_reasons: dict[str, int] = {}
        self.report_path: Path | None = None
        self.report_error: str | None = None
        self.asset_error: str | None = None   # a picture could not be written (here or on a worker)
        self._case_json: dict[str, str] = {}
        self._planned_json: dict[str, str] = {}   # the first record of each case, before it runs

    # -- session start (controller) ----------------------------------------------------------------
    def start(self) -> None:
        """Prove the report folder is writable before any model runs, and open this run's asset folder."""
        from audit import report

        report.check_writable(self.report_dir)
        self.run_id, _ = report.new_run_dir(self.report_dir)

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
            self._case_json[nodeid] = record.to_json()
        item.user_properties.append((CASE_PROP, self._case_json[nodeid]))

    def note_planned(self, item: Any) -> None:
        """A first record of the case before its setup, so a case pytest skips by its marks is still shown."""
        from audit.session import model_label

        ref, case = item.ref, item.ref.case
        planned = self._planned_json.get(ref.nodeid)
        if planned is None:   # one string per case, shared by its checks' items
            planned = self._planned_json[ref.nodeid] = records.error_record(
                ref.nodeid, str(ref.spec.path), case.location.line, case.id, model_label(ref.model),
                str(case.image), None, case.location.record, case.label).to_json()
        item.user_properties.append((CASE_PROP, planned))

    def forget(self, nodeid: str) -> None:
        """Every check of a case ran: its record strings are no longer needed here (a 10,000-case
        serial run kept them all, ~2.5 KB a case)."""
        self._case_json.pop(nodeid, None)
        self._planned_json.pop(nodeid, None)

    def note_check(self, item: Any, result: Any) -> None:
        item.user_properties.append((CHECK_PROP, json.dumps(result.to_dict())))

    def note_spec_check(self, item: Any, result: Any) -> None:
        """A spec-scope check (gates, sanity) shows in the report as a case of its own."""
        record = records.error_record(item.nodeid, str(item.spec.path), None, f"{item.spec.path.name} [{item.name}]",
                                      None, None, None)
        item.user_properties.append((CASE_PROP, record.to_json()))
        self.note_check(item, result)

    def note_broken(self, item: Any, message: str) -> None:
        record = records.error_record(item.nodeid, str(item.path), getattr(item.error, "line", None),
                                      "(invalid spec)", None, None, message)
        item.user_properties.append((CASE_PROP, record.to_json()))

    def _case_record(self, ref: Any, observation: Any, audit: Any, error: str | None) -> records.CaseRecord:
        from audit.session import model_label

        case = ref.case
        if observation is None:
            return records.error_record(ref.nodeid, str(ref.spec.path), case.location.line, case.id,
                                        model_label(ref.model), str(case.image), error, case.location.record,
                                        case.label)
        kinds = audit.kinds_for(case)
        record = records.build(observation, kinds, model_label(ref.model))
        if self.asset_dir is not None:
            from audit import report

            e = observation.explanation
            outlines: dict[str, list] = {"expected": [], "avoid": []}
            extra = {}
            mark_peak = False
            for kind in kinds:
                prepared = observation.prepared.get(kind.name)
                mark_peak = mark_peak or kind.marks_peak(prepared)
                for region in kind.regions(prepared):
                    outlines.setdefault(region.role, []).extend(region.outlines)
                for key, picture in kind.pictures(prepared, observation).items():
                    extra[(kind.name, key)] = picture
            record.assets = report.render_case_assets(
                self.asset_dir, ref.nodeid, observation.image, e.cams[observation.subject],
                outlines["expected"], outlines["avoid"], e.geometry.seen_box,
                {f.layer: e.features[f.layer] for f in case.features},
                {f.layer: f.max_channels or records.default_channels(e.features[f.layer].shape[0])
                 for f in case.features},
                colormap=self.colormap, extra=extra, mark_peak=mark_peak)
        return record

    # -- controller: rebuild from reports --------------------------------------------------------
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = records_of(report)
        if CASE_PROP not in props:
            # A spec item's report without our record: a worker died while running it (xdist's crash
            # report) or something outside our hooks failed. pytest counts it, so the report must too.
            placeholder = _placeholder_case(report)
            if placeholder is None or (report.passed and report.when != "call"):
                return
            props = {CASE_PROP: json.dumps(placeholder)}
        text = props[CASE_PROP]
        case = _case_from_json(text)
        stored = self.cases.get(case["nodeid"])
        if stored is None:
            stored = self.cases.add(case["nodeid"], text, case)
        if case.get("kinds") and not stored.has("kinds"):
            stored.overrides["kinds"] = case["kinds"]
        if stored.has("placeholder") and not case.get("placeholder"):   # the real record arrived
            stored.rebase(text, case)
        if case.get("assets") and not stored.has("assets"):
            stored.rebase(text, case)
        if case.get("error") and not stored.has("error"):
            stored.overrides["error"] = case["error"]
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
        if hasattr(report, "wasxfail"):   # pytest's xfail: an expected failure, or one that passed anyway
            outcome = "xfailed" if report.skipped else "xpassed"
            reason = str(report.wasxfail or "").removeprefix("reason: ")
            message = f"expected to fail{': ' + reason if reason else ''}" + (f"\n{message}" if message else "")
        elif report.skipped:
            reason = _skip_reason(report)
            message = reason
            self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1
        stored.add_check({"kind": check.get("kind", kind), "outcome": outcome, "message": message,
                          "metrics": check.get("metrics", []), "duration_s": report.duration,
                          "nodeid": report.nodeid, **({"data": check["data"]} if check.get("data") else {})})

    def add_stats(self, payload: dict) -> None:
        for name, value in payload.get("stats", {}).items():
            self.stats[name] = self.stats.get(name, 0) + value
        self.models.update(payload.get("models", {}))
        self.asset_error = self.asset_error or payload.get("asset_error")

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(OUTCOMES, 0)
        for stored in self.cases:
            for outcome in stored.outcomes():
                counts[outcome] += 1
        return {k: v for k, v in counts.items() if v or k in OUTCOMES[:4]}   # xfail counts only when any

    def case_list(self) -> "CaseList":
        """Every case as ``results.json`` and the page show it, parsed one at a time when read."""
        return CaseList(list(self.cases))

    def finish(self, config: pytest.Config, session: pytest.Session) -> None:
        """Write results.json and the HTML report (controller only); a failure here never hides results."""
        if self.report_dir is None:
            return
        from audit import report

        if self.asset_error:   # the page would show holes: keep the previous report, free the space
            report.discard_run(self.report_dir, self.run_id)
            self.report_error = f"its pictures could not be written: {self.asset_error}"
            return
        if not self.cases:   # a mistyped path or -k: nothing was checked, so the last good report stays
            self.kept_report = True
            report.discard_run_dir(self.report_dir, self.run_id)
            return

        run = {"started": dt.datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
               "duration_s": round(time.time() - self.started, 3), "models": list(self.models.values()),
               "versions": library_versions(python=True), "counts": self.counts(), "args": list(config.invocation_params.args),
               "device": self.device,
               "stats": self.stats}
        try:
            self.report_path = report.write_report(self.report_dir, run, self.case_list(), self.run_id,
                                                   self_contained=self.self_contained)
        except Exception as exc:  # the test outcomes stand; the report problem is said once, loudly
            self.report_error = f"{type(exc).__name__}: {exc}"

    def kind_summaries(self) -> list[str]:
        """Each check kind's end-of-run lines (baselines recorded / unchanged / unused ...).

        Only kinds with a ``summary`` of their own are asked, and the specs are the ones collected in
        this process (read again only on an xdist controller, which collects nothing): parsing every
        check of a 10,000-case run, and building its spec's 10,000 cases a second time, raised the run's
        peak memory by ~7 KB a case for lines nobody would print.
        """
        if self.session is None:
            return []
        from audit.errors import AuditError
        from audit.kinds.base import CheckKind
        from audit.spec import load_spec

        kinds = [kind for kind in self.session.registry.kinds()
                 if getattr(type(kind), "summary", None) is not CheckKind.summary]
        if not kinds:
            return []
        specs = []
        for path in dict.fromkeys(stored.spec for stored in self.cases if stored.spec):
            try:
                specs.append(self.session.specs.get(path) or load_spec(path, self.session.registry))
            except (AuditError, OSError):
                continue
        lines: list[str] = []
        for kind in kinds:
            checks = [ch for stored in self.cases for ch in stored.checks(kind.name)]
            lines += kind.summary(checks, specs, self.session.run)
        return lines

    # -- terminal -------------------------------------------------------------------------------------
    def summary_lines(self) -> list[str]:
        lines = []
        if self.cases:
            counts = self.counts()
            s = self.stats
            spec_kinds = {k.name for k in self.session.registry.kinds("spec")} if self.session is not None else set()
            spec_level = sum(1 for stored in self.cases if stored.kinds() and stored.kinds() <= spec_kinds)
            scope = _n(len(self.cases) - spec_level, 'case') + (f" and {_n(spec_level, 'spec-level check')}"
                                                                  if spec_level else "")
            lines.append(f"model-audit: {scope}; checks: {counts['passed']} passed, "
                         f"{counts['failed']} failed, {_n(counts['error'], 'error')}, {counts['skipped']} skipped; "
                         f"{_n(int(s.get('model_loads', 0)), 'model load')}, {_n(int(s.get('images', 0)), 'image')} "
                         f"in {_n(int(s.get('forward_passes', 0)), 'forward pass', 'forward passes')}")
        for reason, n in self.skip_reasons.items():
            lines.append(f"model-audit: {_n(n, 'check')} did not run: {reason} "
                         f"(use --audit-strict to make this an error)")
        lines += self.kind_summaries()
        if self.kept_report:
            lines.append(f"model-audit: no spec case ran; the report in {self.report_dir} was left as it was")
        if self.report_path is not None:
            lines.append(f"model-audit report: {self.report_path}")
        if self.report_error:
            lines.append(f"model-audit: the report could not be written ({self.report_error}); "
                         f"the previous report was left in place and this run exits non-zero")
        return lines


class TextSpool:
    """Texts kept in an unlinked temporary file and read back by (offset, length): what the controller
    holds of every case (its record, its checks' results) is needed again only when the report is
    written, and a 10,000-case run must not hold it all in memory (~4.5 KB a case, tracemalloc)."""

    def __init__(self) -> None:
        self._file: Any = None
        self._end = 0

    def put(self, text: str) -> tuple[int, int]:
        if self._file is None:
            self._file = tempfile.TemporaryFile()
        data = text.encode("utf-8")
        self._file.seek(self._end)
        self._file.write(data)
        at = (self._end, len(data))
        self._end += len(data)
        return at

    def get(self, at: tuple[int, int]) -> str:
        self._file.seek(at[0])
        return self._file.read(at[1]).decode("utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class StoredCase:
    """One case on the controller: its record (spooled JSON text), the fields later records changed,
    and the checks the controller adds (each check's kind and outcome in memory, the rest spooled).
    Parsing every record at once held ~10 KB per case (tracemalloc, 1,500 cases), keeping the texts
    ~4.5 KB: a 10,000-case golden set's memory grew with N; this grows by a few hundred bytes."""

    __slots__ = ("spool", "at", "overrides", "_checks", "spec", "_set")

    def __init__(self, spool: TextSpool, text: str, case: dict) -> None:
        self.spool = spool
        self._checks: list[tuple[str, str, tuple[int, int]]] = []   # (kind, outcome, spooled check)
        self.spec = case.get("spec")
        self.rebase(text, case)

    def rebase(self, text: str, case: dict) -> None:
        """Take every field (but the checks) from this record, as ``dict.update`` would."""
        self.at = self.spool.put(text)
        self.overrides: dict[str, Any] = {}
        self._set = {key for key in ("kinds", "assets", "error", "placeholder") if case.get(key)}

    def has(self, key: str) -> bool:
        """Whether the case's ``key`` is set (truthy)."""
        return bool(self.overrides[key]) if key in self.overrides else key in self._set

    def add_check(self, check: dict) -> None:
        self._checks.append((sys.intern(check["kind"]), sys.intern(check["outcome"]),
                             self.spool.put(json.dumps(check))))

    def outcomes(self) -> list[str]:
        return [outcome for _, outcome, _ in self._checks]

    def kinds(self) -> set[str]:
        """The kinds of the checks that ran on this card (a spec-level card holds only spec-scope kinds)."""
        return {kind for kind, _, _ in self._checks}

    def checks(self, kind: str | None = None) -> list[dict]:
        """The checks' results (of one kind, or all), parsed from the spool."""
        return [json.loads(self.spool.get(at)) for name, _, at in self._checks if kind is None or name == kind]

    def as_dict(self) -> dict:
        return {**_case_from_json(self.spool.get(self.at)), **self.overrides, "checks": self.checks()}


class CaseStore:
    """The run's cases by node id, in the order their first report came; their texts in one spool."""

    def __init__(self) -> None:
        self._cases: dict[str, StoredCase] = {}
        self.spool = TextSpool()

    def get(self, nodeid: str) -> StoredCase | None:
        return self._cases.get(nodeid)

    def add(self, nodeid: str, text: str, case: dict) -> StoredCase:
        stored = self._cases[nodeid] = StoredCase(self.spool, text, case)
        return stored

    def __iter__(self):
        return iter(self._cases.values())

    def __len__(self) -> int:
        return len(self._cases)


class CaseList:
    """The cases of ``results.json`` and the page, each parsed when it is read, never all at once: the
    page streams (a first pass for its table and summaries, then one card at a time)."""

    def __init__(self, stored: list[StoredCase]) -> None:
        self._stored = stored

    def __len__(self) -> int:
        return len(self._stored)

    def __getitem__(self, index: int) -> dict:
        case = self._stored[index].as_dict()
        outcomes = [c["outcome"] for c in case["checks"]] or ["error" if case.get("error") else "skipped"]
        case["outcome"] = max(outcomes, key=_ORDER.__getitem__)
        return case

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _n(count: int, singular: str, plural: str | None = None) -> str:
    """"1 case", "2 cases", "1 forward pass"."""
    return f"{count} {singular if count == 1 else (plural or singular + 's')}"


@functools.lru_cache(maxsize=64)
def _case_from_json(text: str) -> dict:
    """A case record, parsed once: the setup, call and teardown reports of each check all carry it.

    Callers copy before they change anything (``{**case, ...}``); the cache's dicts stay as parsed.
    """
    data = json.loads(text)
    case = records.CaseRecord.from_dict(data).as_dict()
    if data.get("placeholder"):
        case["placeholder"] = True
    return case


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
            "kinds": {}, "error": None, "features": [], "placeholder": True}



def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    return reason.removeprefix("Skipped: ").removeprefix("model-audit: ")


def _longrepr_text(report: pytest.TestReport) -> str:
    return str(report.longreprtext or "").strip()
