"""Two runs of the shipped shapes specs write the same results.json, apart from time and the run id.

The normaliser drops exactly the fields that are allowed to differ (timings, the start time, the
command-line args naming the report folder) and replaces the run id inside asset paths; anything else
that differs between two runs of the same model on the same images is nondeterminism: a bug.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, check_report

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")

#: Keys whose values are wall-clock readings or the invocation itself, wherever they appear.
TIMING_KEYS = frozenset({"duration_s", "started", "observe_s", "args",
                         "model_load_s", "forward_s"})  # run.stats timings (seconds) as well
RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")


def normalise(value: Any, run_id: str) -> Any:
    """``value`` without timing keys, with ``run_id`` in every string (keys too) replaced by ``<run>``."""
    if isinstance(value, dict):
        return {k.replace(run_id, "<run>"): normalise(v, run_id) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [normalise(v, run_id) for v in value]
    if isinstance(value, str):
        return value.replace(run_id, "<run>")
    return value


def run_id_of(folder: Path) -> str:
    runs = [p.name for p in (folder / "assets").iterdir() if p.is_dir()]
    assert len(runs) == 1 and RUN_ID.fullmatch(runs[0]), runs
    return runs[0]


def test_normaliser_drops_only_timings_and_the_run_id():
    record = {"run": {"started": "t", "duration_s": 1.0, "args": ["r1"], "device": "cpu",
                      "stats": {"forward_s": 0.3, "model_load_s": 0.1, "forward_passes": 1}},
              "cases": [{"observe_s": 0.2, "assets": {"image": "assets/20260101-000000-abcdef/x.jpg"},
                         "checks": [{"duration_s": 0.1, "outcome": "passed"}], "top_k": [{"prob": 0.5}]}]}
    assert normalise(record, "20260101-000000-abcdef") == {
        "run": {"device": "cpu", "stats": {"forward_passes": 1}},
        "cases": [{"assets": {"image": "assets/<run>/x.jpg"}, "checks": [{"outcome": "passed"}],
                   "top_k": [{"prob": 0.5}]}]}


def test_two_runs_of_the_shipped_specs_give_identical_results(pytester):
    shutil.copytree(REPO / "specs" / "shapes", pytester.path / "shapes",
                    ignore=shutil.ignore_patterns("baselines"))
    ids = []
    data = []
    for folder in ("r1", "r2"):
        result = pytester.runpytest("shapes", "--audit-report", folder, "-p", "no:cacheprovider")
        result.assert_outcomes(passed=44)  # 16 prediction, 16 focus, 12 invariance
        report = check_report(pytester, [], folder=folder)
        ids.append(sorted(c["case_id"] for c in report.data["cases"]))
        data.append(normalise(report.data, run_id_of(pytester.path / folder)))
    assert ids[0] == ids[1] and len(ids[0]) == 16
    first, second = data
    assert first["run"] == second["run"]
    for a, b in zip(first["cases"], second["cases"]):
        assert a == b, a["case_id"]
    assert first == second


def test_two_runs_draw_byte_identical_pictures(pytester):
    shutil.copytree(REPO / "specs" / "shapes", pytester.path / "shapes",
                    ignore=shutil.ignore_patterns("baselines"))
    pictures = []
    for folder in ("r1", "r2"):
        result = pytester.runpytest("shapes", "--audit-report", folder, "-p", "no:cacheprovider")
        result.assert_outcomes(passed=44)  # 16 prediction, 16 focus, 12 invariance
        assets = pytester.path / folder / "assets" / run_id_of(pytester.path / folder)
        pictures.append({p.name: p.read_bytes() for p in sorted(assets.iterdir())})
    assert pictures[0].keys() == pictures[1].keys() and len(pictures[0]) > 16
    assert [n for n in pictures[0] if pictures[0][n] != pictures[1][n]] == []
