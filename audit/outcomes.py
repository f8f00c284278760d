"""What a terminal and a CI screen show of a check: the failing metric first, flat JUnit properties.

Two things pytest shows without our help are cut short: ``--tb=line`` prints the first 50 characters
of a failure text that has no crash location, and the short summary (``-ra``) the first line, cut at
the terminal's width. So a failure's first line is the failing metrics ("energy_inside=0.02 >= 0.50
FAIL"), and the text carries a ``reprcrash`` (path:line: metrics) that ``--tb=line`` prints whole.

The case and check records ride to the controller inside pytest's reports (also through xdist). They
used to ride on ``user_properties``, which pytest's junitxml writes out verbatim: a JSON blob of the case
per item, 5.6 MB for 300 cases. ``pytest_runtest_makereport`` moves them to a report attribute of their
own (``RECORDS_ATTR``: reports keep unknown attributes, and xdist serialises them) and leaves flat
properties a CI screen can show: ``top1=circle``, ``energy_inside=0.02``.
"""
from __future__ import annotations

import functools
import json
import math
import re
from typing import Any, Callable, Iterable

import pytest

from audit.records import shared_text

CASE_PROP = "model_audit_case"
CHECK_PROP = "model_audit_check"
RECORDS_ATTR = "model_audit_records"
_INDEXED = re.compile(r"^(\w+)\[(\d+)\]$")


class _Crash:
    """Duck-types pytest's crash location: ``--tb=line`` prints ``str()``, the summary ``.message``."""

    def __init__(self, path: str, lineno: int | None, message: str):
        self.path, self.lineno, self.message = path, lineno, message

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}: {self.message}" if self.lineno else f"{self.path}: {self.message}"


class FailureText(str):
    """A failure text (what ``repr_failure`` returns) that also knows its spec location and metrics.

    ``toterminal`` makes pytest-xdist send it as a plain string (it cannot pickle a subclass), so the
    first line carries the failing metrics on its own.
    """

    reprcrash: _Crash

    def toterminal(self, out: Any) -> None:
        out.line(str(self))


def metric_text(metric: Any, label_of: Callable[[int], str]) -> str:
    """``str(metric)`` with class indices named: "top1=ring, expected circle FAIL", "in_top_k[star]=no"."""
    name = metric.name
    status = "ok" if metric.passed else "FAIL"
    if name == "top1":
        return f"top1={_label(metric.value, label_of)}, expected {_label(metric.threshold, label_of)} {status}"
    indexed = _INDEXED.match(name)
    if indexed:
        shown = f"{indexed.group(1)}[{_label(int(indexed.group(2)), label_of)}]"
        value = "yes" if metric.value is True else "no" if metric.value is False else metric.value
        return f"{shown}={value} {status}"
    return str(metric)


def _label(index: Any, label_of: Callable[[int], str]) -> str:
    try:
        return str(label_of(int(index)))
    except Exception:   # an index the model does not have: show it as it is
        return f"#{index}"


def failure_text(path: Any, line: int | None, case_id: str, kind: str, result: Any,
                 label_of: Callable[[int], str], one_line: bool = False) -> FailureText:
    """First line: the failing metrics; second: where ("spec.yaml:16: circle-01 [focus] failed"); then
    the check's own message. ``one_line`` (``--tb=line``): the metrics line only, as pytest shows the
    exception line of a plain test before its crash location."""
    failing = [metric_text(m, label_of) for m in result.metrics if not m.passed]
    headline = "; ".join(failing) or result.message.splitlines()[0]
    body = headline if one_line else f"{headline}\n{path}:{line}: {case_id} [{kind}] failed\n{result.message}"
    text = FailureText(body)
    text.reprcrash = _Crash(str(path), line, f"{case_id} [{kind}]: {headline}")
    return text


def _flat_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def flat_properties(case: dict | None, check: dict | None) -> list[tuple[str, str]]:
    """Name/value pairs for JUnit: the case's top-1 and each metric of this item's check.

    pytest keeps every report to the end of the session, so names and labels (a few distinct strings
    in 10,000 cases) are interned rather than held once per report."""
    props: list[tuple[str, str]] = []
    labels: dict[int, str] = {}
    if case:
        top = case.get("top_k") or []
        labels = {int(t["index"]): str(t["label"]) for t in top if t.get("index") is not None}
        if top:
            props += [("top1", shared_text(str(top[0]["label"]))), ("top1_prob", _flat_value(float(top[0]["prob"])))]
        if case.get("error"):
            props.append(("error", str(case["error"]).splitlines()[0]))
    for m in (check or {}).get("metrics") or ():
        name, value = str(m.get("name")), m.get("value")
        if name == "top1":
            continue   # the case's top1 is already there, as a label
        indexed = _INDEXED.match(name)
        if indexed and int(indexed.group(2)) in labels:
            name = f"{indexed.group(1)}[{labels[int(indexed.group(2))]}]"
        name = shared_text(name)
        if name == "pointing_game" and isinstance(value, bool):
            props.append((name, "hit" if value else "miss"))
        else:
            props.append((name, _flat_value(value)))
    return props


def split_properties(pairs: Iterable[tuple[str, Any]]) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    """(our records, everything else) of a report's user_properties."""
    records: dict[str, str] = {}
    rest: list[tuple[str, Any]] = []
    for name, value in pairs:
        if name in (CASE_PROP, CHECK_PROP):
            records[name] = value
        else:
            rest.append((name, value))
    return records, rest


def records_of(report: Any) -> dict[str, str]:
    """The case/check records of a report, wherever they ride (the attribute, or an older worker's
    user_properties)."""
    records = getattr(report, RECORDS_ATTR, None)
    if records:
        return records
    return split_properties(getattr(report, "user_properties", ()))[0]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Move our records off ``user_properties``. Flat properties go on the teardown report only: the
    one junitxml reads them from (pytest keeps every report to the end; three copies per item were ~2 KB
    a case). After the teardown report the item's own records are dropped, nothing reads them again."""
    report = yield
    records, rest = split_properties(report.user_properties)
    if records:
        setattr(report, RECORDS_ATTR, records)
        if call.when == "teardown":
            case = parsed_record(records[CASE_PROP]) if CASE_PROP in records else None
            check = parsed_record(records[CHECK_PROP]) if CHECK_PROP in records else None
            rest += flat_properties(case, check)
            item.user_properties[:] = split_properties(item.user_properties)[1]
        report.user_properties = rest
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> Any:
    """Drop the records from a report once every plugin has seen it (xdist's worker has sent it, our
    collectors have read it): pytest keeps all reports until the session ends, and a 10,000-case run
    must not keep 30,000 references to its records."""
    try:
        return (yield)
    finally:
        report.__dict__.pop(RECORDS_ATTR, None)


@functools.lru_cache(maxsize=64)
def parsed_record(text: str) -> dict:
    """A record parsed once: the setup, call and teardown reports of an item all carry the same one.
    Shared: callers never change the dict."""
    return json.loads(text)
