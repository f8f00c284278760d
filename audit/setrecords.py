"""Every case's outcomes, gathered in every process, for the spec-scope items that judge a whole set.

A ``spec.yaml::gates`` item computes set-level numbers from every case of its spec. In a serial run
those cases ran in the same process; under pytest-xdist they ran on several workers, and a worker only
sees its own reports. So each process keeps what its reports say (the same ``user_properties`` the
controller's report is built from), and under xdist each worker also appends it, one JSON line per
check, to its own file in a folder the controller created for the run. Spec-scope items come last
in the collection, so every case item has been handed to a worker before them; the gates item waits
(bounded: ``WAIT_S`` without a new line) for the lines still missing, and fails with a message rather
than gate on part of the set.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from audit.outcomes import CASE_PROP, CHECK_PROP, parsed_record, records_of
from audit.records import shared_text

GATE_METRICS = frozenset({"top1_is_label", "top1", "pointing_game", "energy_inside"})
"""The check metrics :func:`audit.gates.outcome_of` reads; the others are not kept here."""

WAIT_S = 60.0
"""How long a spec-scope item waits without any new record before it gives up on the missing ones."""


class CaseResults:
    """Case records and check outcomes by case node id; a pytest plugin object (its hooks feed it)."""

    def __init__(self, share_dir: Path | None = None, worker_id: str | None = None):
        self.share_dir = Path(share_dir) if share_dir else None
        self.worker_id = worker_id
        self.cases: dict[str, _SetCase] = {}
        self.expected: dict[str, tuple[str, int]] = {}   # case node id -> (spec path, its selected checks)
        self._file = None

    # -- hooks -------------------------------------------------------------------------------------
    def pytest_collection_finish(self, session: Any) -> None:
        from audit.plugin import CheckItem

        self.expected.clear()
        for item in session.items:
            if isinstance(item, CheckItem):
                path, n = self.expected.get(item.ref.nodeid, (shared_text(str(item.ref.spec.path)), 0))
                self.expected[item.ref.nodeid] = (path, n + 1)

    def pytest_runtest_logreport(self, report: Any) -> None:
        props = records_of(report)
        if CASE_PROP not in props:
            return
        if report.when == "setup" and report.outcome == "passed":
            return
        if report.when == "teardown" and report.outcome == "passed":
            return
        record = parsed_record(props[CASE_PROP])
        check = parsed_record(props[CHECK_PROP]) if CHECK_PROP in props else {}
        outcome = report.outcome if report.when == "call" else ("skipped" if report.skipped else "error")
        # only what a set-level gate reads: 10,000 cases must not hold 10,000 copies of every record
        top_k = record.get("top_k") or []
        line = {"case": record.get("nodeid"), "check": report.nodeid, "kind": check.get("kind"),
                "outcome": outcome,
                "metrics": [{"name": m["name"], "value": m.get("value"), "passed": m.get("passed")}
                            for m in check.get("metrics", []) if m.get("name") in GATE_METRICS],
                "record": {"case_id": record.get("case_id"),
                           "top_k": [{"label": top_k[0].get("label")}] if top_k else [],
                           "error": bool(record.get("error"))}}
        self._add(line)
        if self.share_dir is not None:
            self._write(line)

    def pytest_sessionfinish(self, session: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- store -------------------------------------------------------------------------------------
    def _add(self, line: dict) -> None:
        case = self.cases.get(line["case"])
        if case is None:
            case = self.cases[line["case"]] = _SetCase(line["record"])
        elif line["record"].get("top_k") and not case.top1:
            case.take(line["record"])
        case.checks[line["check"]] = (shared_text(line["kind"]), shared_text(line["outcome"]),
                                      tuple((shared_text(m["name"]), m.get("value"), m.get("passed"))
                                            for m in line["metrics"]))

    def _write(self, line: dict) -> None:
        if self._file is None:
            self.share_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.share_dir / f"{self.worker_id or os.getpid()}.jsonl", "a", encoding="utf-8")
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def _read_shared(self) -> None:
        if self.share_dir is None or not self.share_dir.is_dir():
            return
        for path in sorted(self.share_dir.glob("*.jsonl")):
            if path.stem == str(self.worker_id or os.getpid()):
                continue
            with path.open(encoding="utf-8") as fh:
                for text in fh:
                    if text.endswith("\n"):   # a line still being written is read next time
                        self._add(json.loads(text))

    # -- readers -----------------------------------------------------------------------------------
    def for_spec(self, spec_path: Any, wait_s: float = WAIT_S) -> tuple["_CaseViews", list[str]]:
        """The selected cases of one spec with every selected check (``{"nodeid", "record", "checks"}``,
        each built when it is read), and the ones still missing.

        Waits while records of other workers keep arriving; gives up after ``wait_s`` without progress.
        """
        wanted = {case: n for case, (path, n) in self.expected.items() if path == str(spec_path)}
        last_progress, seen = time.monotonic(), -1
        while True:
            self._read_shared()
            missing = [case for case, n in wanted.items() if case not in self.cases or len(self.cases[case].checks) < n]
            have = sum(len(self.cases[case].checks) for case in wanted if case in self.cases)
            if not missing or self.share_dir is None:
                break
            if have != seen:
                seen, last_progress = have, time.monotonic()
            elif time.monotonic() - last_progress > wait_s:
                break
            time.sleep(0.2)
        return _CaseViews([(case, self.cases[case]) for case in wanted if case in self.cases]), missing


class _SetCase:
    """What a set-level gate reads of one case, in slots and tuples: the dicts a gate reads are built
    one case at a time (``_CaseViews``); held as dicts they were ~1 KB a case of a 10,000-case run."""

    __slots__ = ("case_id", "top1", "error", "checks")

    def __init__(self, record: dict) -> None:
        self.checks: dict[str, tuple[str | None, str | None, tuple]] = {}   # check node id -> kind, outcome, metrics
        self.take(record)

    def take(self, record: dict) -> None:
        top_k = record.get("top_k") or []
        self.case_id = record.get("case_id")
        self.top1 = (top_k[0].get("label"),) if top_k else ()
        self.error = bool(record.get("error"))

    def as_dict(self, nodeid: str) -> dict:
        return {"nodeid": nodeid,
                "record": {"case_id": self.case_id, "top_k": [{"label": label} for label in self.top1],
                           "error": self.error},
                "checks": {check: {"kind": kind, "outcome": outcome,
                                   "metrics": [{"name": n, "value": v, "passed": p} for n, v, p in metrics]}
                           for check, (kind, outcome, metrics) in self.checks.items()}}


class _CaseViews:
    """A spec's cases as the dicts :func:`audit.gates.outcome_of` reads, each built when it is read."""

    def __init__(self, cases: list[tuple[str, _SetCase]]) -> None:
        self._cases = cases

    def __len__(self) -> int:
        return len(self._cases)

    def __iter__(self):
        return (case.as_dict(nodeid) for nodeid, case in self._cases)
