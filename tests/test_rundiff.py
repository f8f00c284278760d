"""``audit.rundiff``: two runs' results compared under the batching tolerance, and nothing looser."""
from __future__ import annotations

import copy

from audit import rundiff


def doc() -> dict:
    return {"schema_version": 1,
            "run": {"started": "2026-12-02T10:00:00", "duration_s": 1.5, "args": ["specs/"],
                    "stats": {"forward_passes": 1}, "counts": {"passed": 2, "failed": 0}},
            "cases": [
                {"nodeid": "s.yaml::a", "outcome": "passed", "observe_s": 0.01,
                 "assets": {"heatmap": "assets/20261202-100000-aaaaaa/a-heatmap.jpg"},
                 "top_k": [{"index": 0, "label": "circle", "prob": 0.9800265431404114}],
                 "checks": [{"kind": "focus", "outcome": "passed", "duration_s": 0.001,
                             "message": "energy_inside=0.35 >= 0.30 ok",
                             "metrics": [{"name": "energy_inside", "value": 0.3549999, "threshold": 0.3}]}]},
                {"nodeid": "s.yaml::b", "outcome": "passed", "top_k": [], "checks": []}]}


def test_identical_runs_and_run_owned_keys_are_equal():
    a, b = doc(), doc()
    b["run"].update(started="2026-12-03T11:00:00", duration_s=9.0, args=["-n", "2"], stats={"forward_passes": 2})
    b["cases"][0].update(observe_s=0.5, assets={"heatmap": "assets/20261203-110000-bbbbbb/a-heatmap.jpg"})
    b["cases"].reverse()   # workers finish in any order
    assert rundiff.differences(a, b) == []


def test_batching_noise_is_within_the_tolerance():
    a, b = doc(), doc()
    b["cases"][0]["top_k"][0]["prob"] += 2.4e-7   # the largest change batching made on the shipped specs
    b["cases"][0]["checks"][0]["metrics"][0]["value"] = 0.3550001
    b["cases"][0]["checks"][0]["message"] = "energy_inside=0.36 >= 0.30 ok"   # one rounding apart
    assert rundiff.differences(a, b) == []


def test_real_differences_are_named_with_their_path():
    a = doc()
    changed = copy.deepcopy(a)
    changed["cases"][0]["top_k"][0]["prob"] = 0.97
    assert rundiff.differences(a, changed) == [
        "cases.s.yaml::a.top_k[0].prob: 0.9800265431404114 != 0.97"]
    flipped = copy.deepcopy(a)
    flipped["cases"][1]["outcome"] = "failed"
    flipped["run"]["counts"] = {"passed": 1, "failed": 1}
    assert rundiff.differences(a, flipped) == [
        "cases.s.yaml::b.outcome: 'passed' != 'failed'",
        "run.counts.failed: 0 != 1", "run.counts.passed: 2 != 1"]
    missing = copy.deepcopy(a)
    del missing["cases"][1]
    assert rundiff.differences(a, missing) == ["cases.s.yaml::b: only in the first run"]


def test_messages_differ_in_words_or_in_numbers_beyond_a_printed_digit():
    a, b = doc(), doc()
    b["cases"][0]["checks"][0]["message"] = "energy_inside=0.35 >= 0.30 FAILED"
    c = doc()
    c["cases"][0]["checks"][0]["message"] = "energy_inside=0.37 >= 0.30 ok"
    assert len(rundiff.differences(a, b)) == 1 and len(rundiff.differences(a, c)) == 1


def test_nan_equals_only_nan_and_booleans_are_not_numbers():
    a, b = doc(), doc()
    a["cases"][1]["x"], b["cases"][1]["x"] = float("nan"), float("nan")
    assert rundiff.differences(a, b) == []
    b["cases"][1]["x"] = 0.0
    assert rundiff.differences(a, b) == ["cases.s.yaml::b.x: nan != 0.0"]
    a["cases"][1]["x"], b["cases"][1]["x"] = True, 1
    assert rundiff.differences(a, b) == ["cases.s.yaml::b.x: True != 1"]
