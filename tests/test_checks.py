"""Pins every focus metric with hand-computed values, and the messages of the prediction/focus checks."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from audit.checks import (CheckResult, FocusExpectation, Metric, PredictionExpectation, Ranked, auc,
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


def test_a_uniform_map_misses_the_pointing_game_everywhere():
    uniform = np.full((4, 5), 0.7)
    for region in (box(0, 0, 5, 4), box(0, 0, 1, 1), box(2, 1, 4, 3)):
        assert not pointing_game(uniform, region, tolerance_px=100)
    almost = uniform.copy()
    almost[3, 4] = 0.0                                    # 19 of 20 pixels share the maximum: any may hit
    assert pointing_game(almost, box(0, 0, 1, 1))


def test_check_focus_says_a_uniform_map_points_nowhere():
    result = check_focus(np.ones((4, 5)), FocusExpectation(box(0, 0, 5, 4), pointing_game=True,
                                                          region_desc="box [0, 0, 5, 4]"))
    assert not result.passed
    assert result.message.splitlines()[1] == (
        "  pointing_game=miss FAIL: the heatmap is uniform (all 20 pixels share the maximum): it points "
        "nowhere, so it hits no region; tolerance 0.00 px")


def test_pointing_game_on_all_zero_heat_is_a_miss():
    assert not pointing_game(np.zeros((4, 5)), box(0, 0, 5, 4), tolerance_px=100)


# ----------------------------------------------------------------------------------------- auc

def test_auc_is_the_chance_a_region_pixel_is_hotter_than_an_outside_one():
    heat = np.array([[0.1, 0.2, 0.3, 0.4]])
    assert auc(heat, np.array([[False, False, True, True]])) == 1.0
    assert auc(heat, np.array([[True, True, False, False]])) == 0.0
    # 0.1 beats none of {0.2, 0.3}, 0.4 beats both: 2 of 4 pairs
    assert auc(heat, np.array([[True, False, False, True]])) == 0.5
    # R = {1, 2, 3, 4}, outside: fifteen 0s and the 10: each of R beats 15 of 16 -> 60 / 64
    assert auc(HEAT, box(1, 1, 3, 3)) == pytest.approx(60 / 64)


def test_auc_counts_ties_half_and_a_uniform_map_is_chance():
    heat = np.array([[1.0, 1.0, 2.0, 0.0]])
    # the 1 in R: tie with the other 1 (0.5), below the 2 (0), above the 0 (1) -> 1.5 / 3
    assert auc(heat, np.array([[True, False, False, False]])) == pytest.approx(0.5)
    assert auc(np.full((4, 5), 0.2), box(1, 1, 3, 3)) == 0.5


def test_auc_of_all_zero_heat_is_zero_and_the_focus_check_fails():
    assert auc(np.zeros((4, 5)), box(1, 1, 3, 3)) == 0.0
    assert not check_focus(np.zeros((4, 5)), FocusExpectation(box(1, 1, 3, 3), min_auc=0.0)).passed


def test_auc_of_a_region_covering_the_whole_image_is_refused_and_fails_the_check():
    with pytest.raises(ValueError, match="covers every pixel"):
        auc(HEAT, box(0, 0, 5, 4))
    result = check_focus(HEAT, FocusExpectation(box(0, 0, 5, 4), min_auc=0.5, region_desc="box [0, 0, 5, 4]"))
    assert not result.passed
    assert result.message.splitlines()[1] == (
        "  auc=0.00 >= 0.50 FAIL: box [0, 0, 5, 4] covers the whole image: AUC needs pixels outside it; "
        "use a smaller region or another metric")


def test_check_focus_reports_auc_after_rank_accuracy():
    result = check_focus(HEAT, FocusExpectation(box(1, 1, 3, 3), min_rank_accuracy=0.5, min_auc=0.9))
    assert [m.name for m in result.metrics] == ["rank_accuracy", "auc"]
    assert result.passed and str(result.metrics[1]) == "auc=0.94 >= 0.90 ok"


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


def test_rank_accuracy_gives_pixels_tied_at_the_cut_fractional_credit():
    heat = np.array([[1.0, 1.0, 1.0],
                     [1.0, 0.0, 0.0]])
    # |R| = 2, four pixels tied at 1 share the 2 places: each tied pixel of R counts 2/4
    assert rank_accuracy(heat, np.array([[True, True, False], [False, False, False]])) == 0.5
    assert rank_accuracy(heat, np.array([[False, False, True], [True, False, False]])) == 0.5
    assert rank_accuracy(heat, np.array([[False, True, False], [False, True, False]])) == 0.25  # (0 + 1*2/4)/2
    heat = np.array([[3.0, 1.0, 1.0],
                     [1.0, 0.0, 0.0]])
    # the 3 takes one place (in R); the last place is shared by three 1s, one of them in R: (1 + 1/3) / 2
    assert rank_accuracy(heat, np.array([[True, True, False], [False, False, False]])) == pytest.approx(2 / 3)


def test_rank_accuracy_never_credits_pixels_without_heat():
    heat = np.zeros((10, 10))
    heat[9, 9] = 1.0
    rows_0_to_4 = box(0, 0, 10, 5, size=(10, 10))
    assert energy_inside(heat, rows_0_to_4) == 0.0
    assert rank_accuracy(heat, rows_0_to_4) == 0.0          # was 0.98: the zeros filled the top-50
    heat[0, 0] = heat[0, 1] = 1.0                           # two hot pixels in R, 48 places left for zeros
    assert rank_accuracy(heat, rows_0_to_4) == pytest.approx(2 / 50)


def test_rank_accuracy_with_zero_heat_in_the_region_fails_the_focus_check():
    heat = np.zeros((10, 10))
    heat[9, 9] = 1.0
    result = check_focus(heat, FocusExpectation(box(0, 0, 10, 5, size=(10, 10)), min_rank_accuracy=0.9))
    assert not result.passed
    assert str(result.metrics[0]) == "rank_accuracy=0.00 >= 0.90 FAIL"


def test_rank_accuracy_of_a_uniform_map_is_the_regions_share_of_the_image():
    assert rank_accuracy(np.full((4, 5), 0.3), box(1, 1, 3, 3)) == pytest.approx(4 / 20)


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
    if (heat == heat.max()).sum() == 1 and heat.max() > 0 and heat.size > 1:  # 1 px: uniform
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        assert pointing_game(heat, mask) == bool(mask[y, x])


@PROPS
@given(heats, st.sampled_from([0.0, 1.0, 1.5, math.sqrt(2), 2.0, math.sqrt(5), 3.0]))
def test_pointing_game_matches_brute_force_distances(case, tolerance):
    heat, mask, _ = case
    uniform = bool((heat == heat.max()).all())           # points nowhere: never a hit
    peaks = np.argwhere((heat == heat.max()) & (heat.max() > 0) & (not uniform))
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
def test_rank_accuracy_lies_in_unit_interval_and_matches_a_sort_when_the_cut_has_no_tie(case):
    heat, mask, _ = case
    value = rank_accuracy(heat, mask)
    assert 0.0 <= value <= 1.0
    k = int(mask.sum())
    order = np.argsort(-heat.ravel(), kind="stable")
    cut = heat.ravel()[order[k - 1]]
    if heat.max() > 0 and cut > 0 and (k == heat.size or heat.ravel()[order[k]] < cut):
        assert value == pytest.approx(mask.ravel()[order[:k]].mean())
    # zero heat is never credited
    assert value <= np.count_nonzero(mask & (heat > 0)) / k + 1e-12


@PROPS
@given(heats, st.randoms(use_true_random=False))
def test_rank_accuracy_does_not_depend_on_where_the_pixels_sit(case, random):
    heat, mask, _ = case
    order = list(range(heat.size))
    random.shuffle(order)
    shuffled_heat = heat.ravel()[order].reshape(1, -1)
    shuffled_mask = mask.ravel()[order].reshape(1, -1)
    assert rank_accuracy(shuffled_heat, shuffled_mask) == pytest.approx(rank_accuracy(heat, mask))


@PROPS
@given(heats)
def test_auc_equals_the_pairwise_mann_whitney_count(case):
    heat, mask, _ = case
    if mask.all():
        return
    inside, outside = heat[mask], heat[~mask]
    pairs = (inside[:, None] > outside[None, :]).sum() + 0.5 * (inside[:, None] == outside[None, :]).sum()
    expected = pairs / (inside.size * outside.size) if heat.max() > 0 else 0.0
    assert auc(heat, mask) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------- Quantus

def _quantus(metric: str, heats: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Quantus 0.6.0's score per (heat, mask) pair, as an independent oracle (batch of (1, h, w))."""
    import warnings

    import quantus

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer = getattr(quantus, metric)(disable_warnings=True, display_progressbar=False)
        n = len(heats)
        return np.asarray(scorer(model=None, x_batch=np.zeros((n, 3, *heats.shape[1:]), np.float32),
                                 y_batch=np.zeros(n, int), a_batch=heats[:, None].astype(np.float32),
                                 s_batch=masks[:, None].astype(np.float32), channel_first=True), float)


def _oracle_pairs(seed: int = 0, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Signed maps (a CAM before ReLU) without ties, and boxes of every size and place."""
    rng = np.random.default_rng(seed)
    heats = rng.normal(size=(n, 12, 16)).astype(np.float32)
    heats[::3] = np.maximum(heats[::3], 0)  # some already ReLU'd, with many zeros (tied below the cut)
    masks = np.zeros((n, 12, 16), bool)
    for i in range(n):
        y0, x0 = rng.integers(0, 10), rng.integers(0, 14)
        masks[i, y0:rng.integers(y0 + 1, 13), x0:rng.integers(x0 + 1, 17)] = True
    return heats, masks


def test_energy_and_pointing_game_agree_with_quantus_on_relu_maps():
    heats, masks = _oracle_pairs()
    relu = np.maximum(heats, 0)
    mass = _quantus("RelevanceMassAccuracy", relu, masks)
    pointing = _quantus("PointingGame", relu, masks)
    assert [energy_inside(h, m) for h, m in zip(relu, masks)] == pytest.approx(list(mass), abs=1e-6)
    assert [pointing_game(h, m) for h, m in zip(relu, masks)] == [bool(p) for p in pointing]


def test_rank_accuracy_and_auc_agree_with_quantus_where_no_tie_sits_at_the_cut():
    heats, masks = _oracle_pairs(seed=1)
    relu = np.maximum(heats, 0)
    ours = [rank_accuracy(h, m) for h, m in zip(relu, masks)]
    theirs = _quantus("RelevanceRankAccuracy", relu, masks)
    compared = 0
    for h, m, a, b in zip(relu, masks, ours, theirs):
        k = int(m.sum())
        if np.sort(h.ravel())[::-1][k - 1] > 0:  # the cut has heat: no tie among the |R| hottest
            assert a == pytest.approx(b)
            compared += 1
    assert compared >= 10
    # AUC: ties are counted half by both (sklearn's roc_curve groups equal scores), zeros included
    assert [auc(h, m) for h, m in zip(relu, masks)] == pytest.approx(list(_quantus("AUC", relu, masks)))


def test_quantus_credits_the_zeros_and_uniform_maps_that_we_refuse():
    """The two cases where the metrics differ from Quantus on purpose (issue 17 item 5)."""
    heat = np.zeros((1, 10, 10), np.float32)
    heat[0, 9, 9] = 1.0
    rows_0_to_4 = np.zeros((1, 10, 10), bool)
    rows_0_to_4[0, :5] = True
    assert _quantus("RelevanceRankAccuracy", heat, rows_0_to_4)[0] > 0.9   # zeros ranked by position
    assert rank_accuracy(heat[0], rows_0_to_4[0]) == 0.0
    uniform = np.full((1, 10, 10), 0.5, np.float32)
    # Quantus refuses a batch whose maps are all uniform; next to another map it scores the uniform one
    batch = np.concatenate([uniform, heat])
    assert _quantus("PointingGame", batch, np.concatenate([rows_0_to_4] * 2))[0] == 1.0  # any shared max hits
    assert not pointing_game(uniform[0], rows_0_to_4[0])


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
