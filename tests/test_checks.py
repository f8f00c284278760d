"""Pins every focus metric with hand-computed values, and the messages of the prediction/focus checks."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from audit.checks import (CheckResult, FocusExpectation, Metric, PredictionExpectation, Ranked,
                          check_focus, check_prediction, energy_inside, heat_is_empty, iou_at,
                          pointing_game, rank_accuracy)
from audit.regions import region_mask

# A 4 high (y) x 5 wide (x) heatmap used by several hand computations:
#        x=0  1  2  3  4
HEAT = np.array([[0, 0, 0, 0, 0],   # y=0
                 [0, 1, 2, 0, 0],   # y=1
                 [0, 3, 4, 0, 0],   # y=2
                 [0, 0, 0, 0, 10]],  # y=3
                dtype=np.float32)  # total 20


def box(x0: int, y0: int, x1: int, y1: int, size: tuple[int, int] = (5, 4)) -> np.ndarray:
    return region_mask({"box": [x0, y0, x1, y1]}, size, ".")


# ----------------------------------------------------------------------------------------- energy

def test_energy_inside_is_heat_in_region_over_total():
    # box x in [1, 3), y in [1, 3) holds 1 + 2 + 3 + 4 = 10 of 20
    assert energy_inside(HEAT, box(1, 1, 3, 3)) == pytest.approx(0.5)


def test_energy_inside_does_not_swap_axes():
    # box x in [3, 5), y in [2, 4) holds the 10 at (x=4, y=3); its transpose x in [2, 4), y in [3, 5)
    # does not fit the image, and the swapped box x in [2, 4), y in [3, 4) holds 0
    assert energy_inside(HEAT, box(3, 2, 5, 4)) == pytest.approx(0.5)
    assert energy_inside(HEAT, box(2, 3, 4, 4)) == 0.0


def test_energy_of_whole_image_region_is_one():
    assert energy_inside(HEAT, np.ones_like(HEAT, dtype=bool)) == 1.0


def test_energy_of_all_zero_heat_is_zero_not_nan():
    assert energy_inside(np.zeros((4, 5)), box(0, 0, 5, 4)) == 0.0


# ----------------------------------------------------------------------------------------- pointing

def test_pointing_game_hits_when_the_hottest_pixel_is_in_the_region():
    assert pointing_game(HEAT, box(4, 3, 5, 4))          # the 10 at (x=4, y=3)
    assert not pointing_game(HEAT, box(1, 1, 3, 3))      # holds 1..4 only


def test_pointing_game_tolerance_is_euclidean_and_inclusive():
    heat = np.zeros((4, 7))
    heat[1, 5] = 1.0                                     # peak at (x=5, y=1)
    region = box(0, 0, 4, 4, size=(7, 4))                # nearest region pixel (x=3, y=1): distance 2
    assert not pointing_game(heat, region, 0)
    assert not pointing_game(heat, region, 1.9)
    assert pointing_game(heat, region, 2)
    diagonal = box(0, 3, 4, 4, size=(7, 4))             # nearest (x=3, y=3): sqrt(4 + 4) = 2.83
    assert not pointing_game(heat, diagonal, 2.8)
    assert pointing_game(heat, diagonal, math.sqrt(8))


def test_pointing_game_tolerance_does_not_swap_axes():
    heat = np.zeros((3, 9))
    heat[0, 8] = 1.0                                     # peak (x=8, y=0)
    region = box(0, 2, 1, 3, size=(9, 3))                # single pixel (x=0, y=2): distance sqrt(64 + 4)
    assert not pointing_game(heat, region, 8.2)
    assert pointing_game(heat, region, 8.25)             # sqrt(68) = 8.246


def test_pointing_game_any_tied_maximum_may_hit():
    heat = np.zeros((4, 5))
    heat[0, 0] = heat[3, 4] = 5.0                        # two maxima, only (x=4, y=3) is in the region
    assert pointing_game(heat, box(3, 2, 5, 4))
    assert pointing_game(heat, box(0, 0, 1, 1))
    assert not pointing_game(heat, box(2, 0, 3, 4))
    assert pointing_game(heat, box(2, 0, 3, 4), tolerance_px=2)  # (x=0, y=0) -> (x=2, y=0): 2 px


def test_pointing_game_on_all_zero_heat_is_a_miss():
    assert not pointing_game(np.zeros((4, 5)), box(0, 0, 5, 4), tolerance_px=100)


# ----------------------------------------------------------------------------------------- iou

def test_iou_thresholds_at_a_fraction_of_the_max():
    # max 10, threshold 5: hot = {(x=4, y=3)}; region x in [3, 5), y in [2, 4): 4 px; IoU = 1 / 4
    assert iou_at(HEAT, box(3, 2, 5, 4)) == pytest.approx(0.25)
    # fraction 0.2: threshold 2 -> hot = {2, 3, 4, 10} = 4 px; region x in [1, 3), y in [1, 3) = {1, 2, 3, 4}
    # intersection {2, 3, 4} = 3, union 5 -> 0.6
    assert iou_at(HEAT, box(1, 1, 3, 3), fraction=0.2) == pytest.approx(0.6)


def test_iou_threshold_is_inclusive():
    heat = np.array([[1.0, 2.0, 4.0]])
    assert iou_at(heat, np.array([[False, True, True]]), fraction=0.5) == 1.0  # 2 >= 0.5 * 4


def test_iou_of_all_zero_heat_is_zero():
    assert iou_at(np.zeros((4, 5)), box(0, 0, 5, 4)) == 0.0


# ----------------------------------------------------------------------------------------- rank

def test_rank_accuracy_counts_the_region_size_hottest_pixels():
    # region x in [1, 3), y in [1, 3): |R| = 4; the 4 hottest are 10, 4, 3, 2 -> 3 of 4 inside
    assert rank_accuracy(HEAT, box(1, 1, 3, 3)) == pytest.approx(0.75)


def test_rank_accuracy_breaks_ties_in_row_major_order():
    heat = np.array([[1.0, 1.0, 1.0],
                     [1.0, 0.0, 0.0]])
    # |R| = 2, four pixels tied at 1: the first two in row-major order are (x=0, y=0), (x=1, y=0)
    assert rank_accuracy(heat, np.array([[True, True, False], [False, False, False]])) == 1.0
    assert rank_accuracy(heat, np.array([[False, False, True], [True, False, False]])) == 0.0
    assert rank_accuracy(heat, np.array([[False, True, False], [True, False, False]])) == 0.5


def test_rank_accuracy_of_all_zero_heat_is_zero():
    assert rank_accuracy(np.zeros((4, 5)), box(0, 0, 2, 2)) == 0.0


# ----------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("metric", [energy_inside, pointing_game, iou_at, rank_accuracy])
@pytest.mark.parametrize("heat, mask, reason", [
    (np.zeros((4, 5)), np.ones((5, 4), bool), "differ in shape"),
    (-np.ones((4, 5)), np.ones((4, 5), bool), "non-negative"),
    (np.full((4, 5), np.nan), np.ones((4, 5), bool), "NaN"),
    (np.full((4, 5), np.inf), np.ones((4, 5), bool), "NaN or infinite"),
    (np.ones((4, 5)), np.zeros((4, 5), bool), "mask is empty"),
    (np.ones((4, 5)), np.ones((4, 5), np.uint8), "bool"),
])
def test_metrics_refuse_inputs_that_are_our_bugs(metric, heat, mask, reason):
    with pytest.raises(ValueError, match=reason):
        metric(heat, mask)


def test_heat_is_empty_only_without_positive_pixels():
    assert heat_is_empty(np.zeros((2, 3)))
    assert not heat_is_empty(np.eye(2) * 1e-30)


# ----------------------------------------------------------------------------------------- properties

heats = st.tuples(st.integers(1, 6), st.integers(1, 7)).flatmap(
    lambda shape: st.tuples(
        arrays(np.float64, shape, elements=st.sampled_from([0.0, 0.25, 1.0, 3.0]) | st.floats(0, 1e6)),
        arrays(np.bool_, shape).filter(lambda m: m.any()),
        arrays(np.bool_, shape).filter(lambda m: m.any())))
PROPS = settings(max_examples=150, deadline=None)


@PROPS
@given(heats)
def test_energy_lies_in_unit_interval(case):
    heat, mask, _ = case
    assert 0.0 <= energy_inside(heat, mask) <= 1.0


@PROPS
@given(heats)
def test_energy_of_a_union_is_at_least_that_of_each_part(case):
    heat, a, b = case
    union = energy_inside(heat, a | b)
    assert union >= energy_inside(heat, a) - 1e-12
    assert union >= energy_inside(heat, b) - 1e-12


@PROPS
@given(heats)
def test_pointing_game_without_tolerance_is_argmax_in_region_when_unique(case):
    heat, mask, _ = case
    if (heat == heat.max()).sum() == 1 and heat.max() > 0:
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        assert pointing_game(heat, mask) == bool(mask[y, x])


@PROPS
@given(heats, st.sampled_from([0.0, 1.0, 1.5, math.sqrt(2), 2.0, math.sqrt(5), 3.0]))
def test_pointing_game_matches_brute_force_distances(case, tolerance):
    heat, mask, _ = case
    peaks = np.argwhere((heat == heat.max()) & (heat.max() > 0))
    region = np.argwhere(mask)
    d2 = ((peaks[:, None, :] - region[None, :, :]) ** 2).sum(-1) if len(peaks) else np.array([np.inf])
    assert pointing_game(heat, mask, tolerance) == bool(d2.min() <= tolerance * tolerance)


@PROPS
@given(heats, st.sampled_from([0.1, 0.5, 1.0]))
def test_iou_lies_in_unit_interval(case, fraction):
    heat, mask, _ = case
    assert 0.0 <= iou_at(heat, mask, fraction) <= 1.0


@PROPS
@given(heats)
def test_rank_accuracy_lies_in_unit_interval_and_matches_stable_argsort(case):
    heat, mask, _ = case
    value = rank_accuracy(heat, mask)
    assert 0.0 <= value <= 1.0
    if heat.max() > 0:
        top = np.argsort(-heat.ravel(), kind="stable")[:mask.sum()]
        assert value == pytest.approx(mask.ravel()[top].mean())


# ----------------------------------------------------------------------------------------- results

def test_metric_str_shows_value_op_threshold_and_verdict():
    assert str(Metric("energy_inside", 0.62, 0.5, ">=", True)) == "energy_inside=0.62 >= 0.50 ok"
    assert str(Metric("energy_inside", 0.499, 0.5, ">=", False)) == "energy_inside=0.499 >= 0.500 FAIL"
    assert str(Metric("pointing_game", False, True, "==", False)) == "pointing_game=miss FAIL"


def test_check_result_to_dict_is_plain_json():
    result = check_focus(HEAT, FocusExpectation(region=box(1, 1, 3, 3), min_energy=np.float32(0.4)))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["kind"] == "focus" and data["passed"] is True
    assert data["metrics"] == [{"name": "energy_inside", "value": 0.5, "threshold": pytest.approx(0.4),
                                "op": ">=", "passed": True}]


# ----------------------------------------------------------------------------------------- prediction

NAMES = {0: "circle", 3: "ring", 5: "star", 7: "square", 8: "triangle"}
RANKED = [Ranked(3, "ring", 0.61), Ranked(0, "circle", 0.25), Ranked(7, "square", 0.08),
          Ranked(8, "triangle", 0.03), Ranked(1, "c1", 0.02), Ranked(5, "star", 0.01)]


def predict(**kw) -> CheckResult:
    return check_prediction(RANKED, PredictionExpectation(**kw), lambda i: NAMES.get(i, f"c{i}"))


def test_prediction_passes_with_a_short_message():
    result = predict(top_k=5, top1=3, in_top_k=(0,), not_in_top_k=(5,))
    assert result.passed and result.kind == "prediction"
    assert result.message == "top1 ring 0.61; all 3 expectations met"


def test_top1_failure_says_expected_and_got():
    result = predict(top_k=5, top1=0)
    assert not result.passed
    assert "top1: expected 'circle' (#0), got 'ring' (#3) p=0.61" in result.message
    assert result.metrics == (Metric("top1", 3, 0, "==", False),)


def test_in_top_k_uses_only_the_first_k_entries():
    result = predict(top_k=5, in_top_k=(5,))
    assert "in_top_k: 'star' (#5) not in top-5 (rank 6, p=0.010)" in result.message


def test_any_in_top_k_needs_only_one():
    assert predict(top_k=2, any_in_top_k=(8, 0)).passed
    result = predict(top_k=2, any_in_top_k=(8, 7))
    assert "any_in_top_k: none of 'triangle' (#8), 'square' (#7) in top-2" in result.message


def test_not_in_top_k_reports_where_the_class_is():
    result = predict(top_k=5, not_in_top_k=(7,))
    assert "not_in_top_k: 'square' (#7) is in top-5 (rank 3, p=0.080)" in result.message


def test_min_prob_applies_to_the_expected_top1_wherever_it_ranks():
    result = predict(top_k=5, top1=0, min_prob=0.5)
    assert "min_prob: p(circle)=0.25 < 0.50" in result.message
    assert result.metrics[-1] == Metric("min_prob", 0.25, 0.5, ">=", False)


def test_min_prob_without_top1_applies_to_the_predicted_top1():
    assert predict(top_k=5, min_prob=0.6).passed
    assert "min_prob: p(ring)=0.61 < 0.70" in predict(top_k=5, min_prob=0.7).message


def test_min_prob_of_an_unranked_class_is_reported_as_a_bound():
    result = predict(top_k=5, top1=9, min_prob=0.005)
    assert "min_prob: p(c9)<0.01 (not among the 6 ranked classes)" in result.message
    assert not result.metrics[-1].passed


def test_every_failed_expectation_is_listed_with_the_top5():
    result = predict(top_k=5, top1=0, in_top_k=(5,), not_in_top_k=(3,), min_prob=0.9)
    lines = result.message.splitlines()
    assert lines[0].startswith("prediction: 4 of 4 expectations not met")
    assert [ln.split(":")[0].strip() for ln in lines[1:5]] == ["top1", "in_top_k", "not_in_top_k", "min_prob"]
    assert lines[5] == "top-5:"
    assert lines[6] == "  1. ring #3 0.610"
    assert len(lines) == 11


# ----------------------------------------------------------------------------------------- focus check

def test_check_focus_passes_and_lists_metrics():
    expectation = FocusExpectation(region=box(3, 2, 5, 4), region_desc="box [3, 2, 5, 4]", min_energy=0.5,
                                   pointing_game=True, target_desc="'star' (#5)")
    result = check_focus(HEAT, expectation)
    assert result.passed
    assert result.message == ("focus of 'star' (#5) on box [3, 2, 5, 4]: "
                              "energy_inside=0.50 >= 0.50 ok, pointing_game=hit ok")


def test_check_focus_names_failed_metric_value_threshold_region_and_reason():
    expectation = FocusExpectation(region=box(1, 1, 3, 3), region_desc="box [1, 1, 3, 3]", min_energy=0.6,
                                   pointing_game=True, tolerance_px=1, min_iou=0.5, iou_threshold=0.2,
                                   min_rank_accuracy=0.7)
    result = check_focus(HEAT, expectation)
    assert not result.passed
    lines = result.message.splitlines()
    assert lines[0] == "focus of the target class on box [1, 1, 3, 3]: 2 of 4 focus checks failed"
    assert lines[1] == ("  energy_inside=0.50 >= 0.60 FAIL: 50% of the heat lies inside box [1, 1, 3, 3]; "
                        "at least 60% required")
    # peak (x=4, y=3), nearest region pixel (x=2, y=2): sqrt(4 + 1) = 2.2
    assert lines[2] == ("  pointing_game=miss FAIL: the hottest point (x=4, y=3) is 2.2 px from "
                        "box [1, 1, 3, 3]; tolerance 1 px")
    assert lines[3].startswith("  iou@0.20=0.60 >= 0.50 ok")
    assert lines[4].startswith("  rank_accuracy=0.75 >= 0.70 ok: of the 4 hottest pixels, 75% lie inside")


def test_check_focus_with_avoid_region_fails_when_heat_sits_there():
    # the watermark corner x in [3, 5), y in [2, 4) holds 10 of 20
    expectation = FocusExpectation(region=box(1, 1, 3, 3), region_desc="box [1, 1, 3, 3]", min_energy=0.4,
                                   avoid=box(3, 2, 5, 4), avoid_desc="box [3, 2, 5, 4]",
                                   max_energy_in_avoid=0.2)
    result = check_focus(HEAT, expectation)
    assert not result.passed
    assert [m.passed for m in result.metrics] == [True, False]
    assert ("energy_in_avoid=0.50 <= 0.20 FAIL: 50% of the heat lies inside box [3, 2, 5, 4]; "
            "at most 20% allowed") in result.message
    relaxed = FocusExpectation(region=box(1, 1, 3, 3), min_energy=0.4, avoid=box(3, 2, 5, 4),
                               max_energy_in_avoid=0.5)
    assert check_focus(HEAT, relaxed).passed


def test_all_zero_heat_fails_every_focus_check_with_the_empty_reason():
    expectation = FocusExpectation(region=box(0, 0, 5, 4), region_desc="box [0, 0, 5, 4]", min_energy=0.0,
                                   pointing_game=True, tolerance_px=100, min_iou=0.0, min_rank_accuracy=0.0,
                                   avoid=box(0, 0, 1, 1), max_energy_in_avoid=1.0, target_desc="'circle' (#0)")
    result = check_focus(np.zeros((4, 5), np.float32), expectation)
    assert not result.passed
    assert len(result.metrics) == 5 and not any(m.passed for m in result.metrics)
    assert not any(isinstance(m.value, float) and math.isnan(m.value) for m in result.metrics)
    assert "empty heatmap: Grad-CAM is zero everywhere for 'circle' (#0)" in result.message
    json.dumps(result.to_dict(), allow_nan=False)


def test_check_focus_without_any_metric_is_a_caller_bug():
    with pytest.raises(ValueError, match="no metric"):
        check_focus(HEAT, FocusExpectation(region=box(0, 0, 1, 1)))
    with pytest.raises(ValueError, match="differ in shape"):
        check_focus(HEAT, FocusExpectation(region=np.ones((5, 4), bool), min_energy=0.5))
