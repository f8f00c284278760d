"""Fixtures and helpers for the robustness suite: specs with one bad input next to good cases.

Every test here runs one small spec through the plugin in-process (``pytester.runpytest``) with
``--audit-report reports`` and then checks three things the issue asks of every bad input: the bad part
gets one clear message, the good cases beside it still run and pass, and the report stays valid
(``results.json`` parses and lists every case, ``index.html`` exists and links only files that exist).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SHAPES = REPO / "specs" / "shapes" / "images"
#: Two shipped scenes of different classes: the good cases that run beside every bad one.
GOOD_SCENES = ("circle-01.png", "square-01.png")


def scene_meta() -> dict[str, dict]:
    return json.loads((SHAPES / "boxes.json").read_text())


@pytest.fixture
def scenes(pytester: pytest.Pytester) -> dict[str, dict]:
    """The two good scenes copied into ``images/`` of the test folder, with their labels and boxes."""
    (pytester.path / "images").mkdir(exist_ok=True)
    meta = scene_meta()
    for name in GOOD_SCENES:
        shutil.copy(SHAPES / name, pytester.path / "images" / name)
    return {name: meta[name] for name in GOOD_SCENES}


def good_case(name: str, meta: dict, **extra: Any) -> dict:
    """A case the shipped model passes: right label, heat on the object's box."""
    entry = {"id": Path(name).stem, "image": f"images/{name}", "expect": {"top1": meta["label"]},
             "focus": {"region": {"box": meta["box"]}, "min_energy": 0.3}}
    entry.update(extra)
    return entry


def good_cases(scenes: dict[str, dict]) -> list[dict]:
    return [good_case(name, meta) for name, meta in scenes.items()]


def write_spec(pytester: pytest.Pytester, name: str, cases: list[dict], model: dict | None = None,
               **top: Any) -> Path:
    spec = {"model": model or {"arch": "shapes_vgg"}, **top, "cases": cases}
    path = pytester.path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def run_with_report(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("--audit-report", "reports", "-p", "no:cacheprovider", *args)


# ------------------------------------------------------------------------------------------- outcomes

def item_outcomes(result: pytest.RunResult) -> dict[str, str]:
    """nodeid -> 'passed' | 'failed' | 'skipped' | 'error', from pytest's own reports (not from ours)."""
    outcomes: dict[str, str] = {}
    reprec = result.reprec  # type: ignore[attr-defined]
    if not hasattr(reprec, "getreports"):  # the session ended before collection (a usage error)
        return outcomes
    for rep in reprec.getreports("pytest_runtest_logreport"):
        if rep.when == "call":
            outcomes[rep.nodeid] = rep.outcome
        elif rep.outcome != "passed":
            outcomes.setdefault(rep.nodeid, "skipped" if rep.skipped else "error")
    return outcomes


def outcomes_of(result: pytest.RunResult, prefix: str) -> dict[str, str]:
    """The outcomes of the items whose node id starts with ``prefix`` (a spec file or a case)."""
    return {k: v for k, v in item_outcomes(result).items() if k.startswith(prefix)}


def assert_good_cases_passed(result: pytest.RunResult, spec: str, scenes: dict[str, dict]) -> None:
    for name in scenes:
        got = outcomes_of(result, f"{spec}::{Path(name).stem}::")
        assert set(got.values()) == {"passed"} and len(got) == 2, got


def assert_no_traceback(result: pytest.RunResult) -> None:
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text, text[-3000:]
    assert "INTERNALERROR" not in text, text[-3000:]


# --------------------------------------------------------------------------------------------- report

class _Links(HTMLParser):
    """Collects every src/href and every <script> element of a page (stdlib parser, no bs4 needed)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.scripts: list[dict[str, str | None]] = []
        self.text: list[str] = []
        self.handlers: list[tuple[str, str]] = []  # (tag, attribute) of every on* event handler

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if key.startswith("on"):
                self.handlers.append((tag, key))
            if key in ("src", "href") and value:
                self.links.append(value)
        if tag == "script":
            self.scripts.append(dict(attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@dataclass
class Report:
    data: dict
    html: str
    parsed: _Links

    def case(self, case_id: str, spec: str | None = None) -> dict:
        found = [c for c in self.data["cases"] if c["case_id"] == case_id
                 and (spec is None or Path(c["spec"]).name == spec)]
        assert len(found) == 1, (case_id, [c["case_id"] for c in self.data["cases"]])
        return found[0]


def check_report(pytester: pytest.Pytester, expected_ids: list[str], folder: str = "reports") -> Report:
    """results.json parses and holds every expected case; index.html exists and links only existing files."""
    out = pytester.path / folder
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    ids = [c["case_id"] for c in data["cases"]]
    for case_id in expected_ids:
        assert case_id in ids, (case_id, ids)
    html = (out / "index.html").read_text(encoding="utf-8")
    parsed = _Links()
    parsed.feed(html)
    parsed.close()
    for link in parsed.links:
        url = urlparse(link)
        if url.scheme in ("data", "") and (link.startswith("#") or url.scheme == "data"):
            continue
        assert url.scheme == "" and not url.netloc, f"the report links outside itself: {link}"
        target = (out / unquote(url.path)).resolve()
        assert target.is_file(), f"index.html references a missing file: {link}"
        assert out.resolve() in target.parents, f"index.html references a file outside the report: {link}"
    for case in data["cases"]:
        for rel in _asset_paths(case.get("assets") or {}):
            assert (out / rel).is_file(), f"results.json names a missing asset: {rel}"
    return Report(data, html, parsed)


def _asset_paths(assets: dict) -> list[str]:
    paths = []
    for value in assets.values():
        if isinstance(value, dict):
            paths.extend(_asset_paths(value))
        elif isinstance(value, str):
            paths.append(value)
    return paths
