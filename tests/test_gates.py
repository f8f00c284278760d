"""Set-level gates: hand-counted numbers, the per-class table, baseline drops, honest edge cases."""
from __future__ import annotations

import json

import pytest

from audit.gates import CaseOutcome, Gates, SetMetrics, class_table, confusion, evaluate_gates, set_metrics


def _outcomes(spec: dict[str, list[tuple[bool, bool | None, float | None]]]) -> list[CaseOutcome]:
    """{label: [(correct, pointing_hit, energy), ...]}; a wrong case predicts 'other'."""
    out = []
    for label, rows in spec.items():
        for i, (correct, hit, energy) in enumerate(rows):
            out.append(CaseOutcome(f"{label}-{i}", label, label if correct else "other", correct, hit, energy))
    return out


SET = _outcomes({
    "cat": [(True, True, 0.9), (True, True, 0.8), (True, False, 0.3), (False, False, 0.1)],
    "dog": [(True, True, 0.7), (True, True, 0.6)],
})


def test_set_metrics_count_by_hand():
    m = set_metrics(SET)
    assert (m.n, m.correct, m.accuracy) == (6, 5, 5 / 6)
    assert (m.pointing_n, m.pointing_hits, m.pointing_rate) == (6, 4, 4 / 6)
    assert m.median_energy == pytest.approx((0.6 + 0.7) / 2)  # sorted 0.1 0.3 0.6 0.7 0.8 0.9
    cat, dog = m.per_class["cat"], m.per_class["dog"]
    assert (cat.n, cat.correct, cat.recall, cat.pointing_rate) == (4, 3, 0.75, 0.5)
    assert cat.median_energy == pytest.approx(0.55) and dog.recall == 1.0


def test_all_gates_met_pass_with_every_number_in_the_message():
    gates = Gates(min_top1_accuracy=0.8, min_per_class_recall=0.75, min_pointing_game_rate=0.6,
                  min_median_energy=0.6)
    result = evaluate_gates(set_metrics(SET), gates)
    assert result.passed, result.message
    assert [m.name for m in result.metrics] == ["top1_accuracy", "min_class_recall", "pointing_game_rate",
                                                "median_energy"]
    assert result.message.startswith("gates: all 4 met over 6 cases: top1_accuracy=0.83 >= 0.80 ok")


def test_failed_gate_lists_each_gate_and_a_worst_first_class_table():
    gates = Gates(min_top1_accuracy=0.8, min_per_class_recall=0.9, min_pointing_game_rate=0.85)
    result = evaluate_gates(set_metrics(SET), gates)
    assert not result.passed
    lines = result.message.splitlines()
    assert lines[0] == "gates: 2 of 3 gates failed over 6 cases"
    assert lines[1].startswith("  top1_accuracy=0.83 >= 0.80 ok: 5 of 6 cases")
    assert lines[2] == "  min_class_recall=0.75 >= 0.90 FAIL: lowest: 'cat' 3/4; below the floor: 'cat'"
    assert lines[3] == "  pointing_game_rate=0.67 >= 0.85 FAIL: 4 of 6 hottest points inside the annotation"
    assert lines[4].split() == ["class", "n", "recall", "pointing", "energy"]
    assert lines[5].split() == ["cat", "4", "0.750", "0.500", "0.550"]
    assert lines[6].split() == ["dog", "2", "1.000", "1.000", "0.650"]


def test_thresholds_met_exactly_pass_despite_float_rounding():
    m = set_metrics(_outcomes({"a": [(True, None, None)] * 19 + [(False, None, None)]}))
    assert evaluate_gates(m, Gates(min_top1_accuracy=0.95)).passed
    now = set_metrics(_outcomes({"a": [(True, None, None)] * 97 + [(False, None, None)] * 3}))
    base = set_metrics(_outcomes({"a": [(True, None, None)] * 99 + [(False, None, None)] * 1}))
    assert base.accuracy - now.accuracy > 0.02  # 0.99 - 0.97 is 0.0200000000000000x in floats
    assert evaluate_gates(now, Gates(max_accuracy_drop=0.02), baseline=base).passed


def test_baseline_drops_name_the_class_that_dropped_most():
    then = set_metrics(_outcomes({"cat": [(True, None, None)] * 4, "dog": [(True, None, None)] * 2}))
    result = evaluate_gates(set_metrics(SET), Gates(max_accuracy_drop=0.2, max_class_recall_drop=0.1), then)
    assert not result.passed
    assert [(m.name, m.passed) for m in result.metrics] == [("accuracy_drop", True),
                                                            ("max_class_recall_drop", False)]
    assert "largest: 'cat' 1.000 at the baseline, 0.750 now" in result.message
    assert result.message.splitlines()[3].endswith("recall then")


def test_baseline_gates_are_not_evaluated_without_a_baseline():
    result = evaluate_gates(set_metrics(SET), Gates(min_top1_accuracy=0.5, max_accuracy_drop=0.0))
    assert result.passed and [m.name for m in result.metrics] == ["top1_accuracy"]


def test_errored_cases_count_as_wrong_and_are_named():
    outcomes = SET + [CaseOutcome("dog-broken", "dog", None, False, False, None, errored=True)]
    m = set_metrics(outcomes)
    assert (m.n, m.correct, m.errored, m.pointing_n) == (7, 5, 1, 7)
    result = evaluate_gates(m, Gates(min_top1_accuracy=0.8))
    assert not result.passed
    assert "5 of 7 cases have the label as top-1 (1 errored, counted wrong)" in result.message
    assert result.message.splitlines()[-1] == "  errored cases: dog-broken"
    assert confusion(outcomes)["dog"] == {"dog": 2, "error": 1}


def test_gate_on_a_quantity_no_case_measured_fails_saying_so():
    m = set_metrics(_outcomes({"a": [(True, None, None)]}))
    result = evaluate_gates(m, Gates(min_pointing_game_rate=0.5, min_median_energy=0.5))
    assert not result.passed
    assert "no case measured the pointing game" in result.message
    assert "no case measured the energy" in result.message


def test_no_case_and_no_gate_are_failures_not_passes():
    assert not evaluate_gates(set_metrics([]), Gates(min_top1_accuracy=0.5)).passed
    assert not evaluate_gates(set_metrics(SET), Gates()).passed


def test_metrics_round_trip_through_json_and_merge_like_one_run():
    m = set_metrics(SET)
    back = SetMetrics.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back.to_dict() == m.to_dict()
    shards = [SET[0::3], SET[1::3], SET[2::3]]
    merged = set_metrics([CaseOutcome.from_dict(json.loads(json.dumps(o.to_dict()))) for s in shards for o in s])
    assert merged.accuracy == m.accuracy and merged.pointing_rate == m.pointing_rate
    assert merged.median_energy == m.median_energy
    assert class_table(merged) == class_table(m)


def test_gates_from_the_spec_mapping():
    gates = Gates.from_raw({"min_top1_accuracy": 0.95, "baseline": {"max_class_recall_drop": 0.05}})
    assert gates == Gates(min_top1_accuracy=0.95, max_class_recall_drop=0.05)
    assert gates.uses_baseline and gates.count(with_baseline=False) == 1
