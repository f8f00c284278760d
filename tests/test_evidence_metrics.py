"""Density of heat in the avoid region, rank correlation, and "does the heatmap follow the flip"."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from audit.evidence_metrics import density_ratio, heatmap_follows, rankdata, spearman


def test_density_ratio_by_hand():
    heat = np.zeros((4, 4))
    heat[0, 0] = 3.0
    heat[3, 3] = 1.0
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = True                       # 2 pixels holding 3 of the 4 units of heat
    # mean inside = 3/2, mean of the image = 4/16 -> 6.0
    assert density_ratio(heat, mask) == pytest.approx(6.0)


def test_density_ratio_is_one_for_uniform_heat_whatever_the_region_size():
    mask = np.zeros((8, 8), bool)
    mask[:1, :3] = True
    assert density_ratio(np.full((8, 8), 0.3), mask) == pytest.approx(1.0)


def test_small_avoid_box_with_low_energy_can_still_be_three_times_hotter_than_average():
    """The issue's case: 3% of the energy in a 6x6 box of a 64x64 map is 3.4x the mean density."""
    heat = np.ones((64, 64))
    mask = np.zeros((64, 64), bool)
    mask[2:8, 2:8] = True
    inside = 0.03 * heat[~mask].sum() / 0.97      # makes the box hold 3% of the energy
    heat[mask] = inside / 36
    assert heat[mask].sum() / heat.sum() == pytest.approx(0.03)
    assert density_ratio(heat, mask) == pytest.approx(0.03 * 4096 / 36)


def test_density_ratio_of_an_empty_map_is_zero_not_nan():
    mask = np.ones((3, 3), bool)
    assert density_ratio(np.zeros((3, 3)), mask) == 0.0


@pytest.mark.parametrize("heat,mask", [
    (np.ones((3, 3)), np.ones((3, 2), bool)),
    (np.ones((3, 3)), np.zeros((3, 3), bool)),
    (-np.ones((3, 3)), np.ones((3, 3), bool)),
    (np.full((3, 3), np.nan), np.ones((3, 3), bool)),
])
def test_density_ratio_refuses_malformed_input(heat, mask):
    with pytest.raises(ValueError):
        density_ratio(heat, mask)


def test_rankdata_matches_scipy_average_ties():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 5, size=200).astype(float)
    np.testing.assert_allclose(rankdata(v), scipy.stats.rankdata(v, method="average"))


def test_spearman_matches_scipy():
    rng = np.random.default_rng(1)
    a = rng.random((16, 16))
    b = a + rng.normal(0, 0.3, size=a.shape)
    b[b < 0.2] = 0.0                          # ties, as after a ReLU
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)


def test_spearman_is_invariant_to_monotone_transforms_and_sign_aware():
    a = np.arange(12, dtype=float).reshape(3, 4)
    assert spearman(a, a ** 3 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_spearman_of_constant_maps():
    assert spearman(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert spearman(np.zeros((2, 2)), np.eye(2)) == 0.0


def test_heatmap_follows_a_flip_only_when_mirrored():
    heat = np.zeros((8, 8))
    heat[2:4, 0:3] = 1.0
    flipped_map = heat[:, ::-1]
    assert heatmap_follows(flipped_map, heat[:, ::-1]) == pytest.approx(1.0)
    assert heatmap_follows(heat, heat[:, ::-1]) < 0.0      # stayed put: anti-correlated with the mirror
