"""Deletion and insertion curves (RISE): step counts, pixel order, area, batching, and Quantus' pixel flipping."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from audit import faithfulness as fa
from audit.faithfulness import CurveRequest

RED = (255, 0, 0)


def _red(w: int = 2, h: int = 2) -> np.ndarray:
    return np.broadcast_to(np.array(RED, np.uint8), (h, w, 3)).copy()


def _red_at_origin(images: list[Image.Image]) -> np.ndarray:
    """A 'model' whose class 0 probability is how red pixel (0, 0) is (class 1 takes the rest)."""
    p = np.array([np.asarray(im)[0, 0, 0] / 255.0 for im in images])
    return np.stack([p, 1 - p], axis=1)


def test_step_counts_round_half_up():
    assert fa.step_counts(10, 4).tolist() == [0, 3, 5, 8, 10]
    assert fa.step_counts(4, 4).tolist() == [0, 1, 2, 3, 4]


def test_normalised_auc_is_the_trapezoid_over_0_1():
    assert fa.normalised_auc([1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert fa.normalised_auc([1.0, 1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert fa.normalised_auc([1.0, 0.0, 0.0, 0.0, 0.0]) == pytest.approx(0.125)


def test_pixel_order_is_hottest_first_ties_row_major():
    heat = np.array([[1.0, 3.0], [3.0, 0.0]])
    assert fa.pixel_order(heat).tolist() == [1, 2, 0, 3]


@pytest.mark.parametrize("heat,expected_probs,expected_auc", [
    # (0, 0) hottest: deleted in the first step, the probability falls at once
    ([[4.0, 3.0], [2.0, 1.0]], [1, 0, 0, 0, 0], 0.125),
    # (0, 0) coldest: deleted last
    ([[1.0, 3.0], [2.0, 4.0]], [1, 1, 1, 1, 0], 0.875),
    # all tied: row-major order, (0, 0) first
    ([[1.0, 1.0], [1.0, 1.0]], [1, 0, 0, 0, 0], 0.125),
])
def test_deletion_curve_by_hand(heat, expected_probs, expected_auc):
    req = CurveRequest(_red(), np.array(heat), target=0, mode="deletion", substrate="constant")
    (curve,) = fa.curves([req], _red_at_origin, steps=4)
    assert curve.probs.tolist() == expected_probs
    assert curve.auc == pytest.approx(expected_auc)
    assert curve.fractions.tolist() == [0, 0.25, 0.5, 0.75, 1.0]


def test_insertion_reveals_hottest_first_onto_the_substrate():
    req = CurveRequest(_red(), np.array([[4.0, 3.0], [2.0, 1.0]]), target=0, mode="insertion",
                       substrate="constant", fill=(0, 0, 0))
    (curve,) = fa.curves([req], _red_at_origin, steps=4)
    assert curve.probs.tolist() == [0, 1, 1, 1, 1]
    assert curve.auc == pytest.approx(0.875)


def test_deletion_by_inpainting_changes_only_deleted_pixels_and_ends_featureless():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    heat = rng.random((8, 8))
    images = list(fa.step_images(CurveRequest(pixels, heat, 0), steps=4))
    assert len(images) == 5
    np.testing.assert_array_equal(images[0], pixels)
    order = fa.pixel_order(heat)
    kept = np.zeros(64, bool)
    kept[order[32:]] = True
    kept = kept.reshape(8, 8)
    np.testing.assert_array_equal(images[2][kept], pixels[kept])      # half deleted: the rest untouched
    assert len(np.unique(images[4].reshape(-1, 3), axis=0)) == 1        # all deleted: one colour


def test_insertion_default_substrate_is_the_rise_blur():
    pixels = np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    first = next(fa.step_images(CurveRequest(pixels, np.ones((16, 16)), 0, mode="insertion")))
    np.testing.assert_array_equal(first, fa.blurred(pixels))


def test_bad_substrate_for_mode_is_refused():
    with pytest.raises(ValueError, match="insertion substrate"):
        fa.curves([CurveRequest(_red(), np.ones((2, 2)), 0, mode="insertion", substrate="inpaint")],
                  _red_at_origin)


def test_many_curves_share_few_predict_calls_and_batching_does_not_change_them():
    rng = np.random.default_rng(2)
    reqs = [CurveRequest(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8), rng.random((6, 6)), 0,
                         substrate="constant") for _ in range(5)]
    calls: list[int] = []

    def predict(images):
        calls.append(len(images))
        return _red_at_origin(images)

    big = fa.curves(reqs, predict, steps=8, batch_size=64)
    assert calls == [45]                          # 5 curves x 9 points in one call
    calls.clear()
    small = fa.curves(reqs, predict, steps=8, batch_size=10)
    assert calls == [10, 10, 10, 10, 5]
    for a, b in zip(big, small):
        np.testing.assert_array_equal(a.probs, b.probs)


def test_deletion_matches_quantus_pixel_flipping():
    """Quantus 0.6.0 PixelFlipping with a zero baseline is our deletion with a black constant substrate
    (its curve omits the intact image, our point 0)."""
    quantus = pytest.importorskip("quantus")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(2, 6, 6, 3), dtype=np.uint8)
    heats = rng.random((2, 6, 6))
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0

    def predict(images):
        batch = torch.from_numpy(np.stack([np.asarray(im) for im in images]).transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            return torch.softmax(model(batch.float() / 255.0), dim=1).numpy()

    y = predict([Image.fromarray(p) for p in pixels]).argmax(1)
    # Quantus wants a step size dividing H*W; it flattens the map broadcast over the 3 channels, so 12
    # values per step are 4 whole pixels (a pixel's 3 tied values sort next to each other): 9 steps
    steps = 9
    ours = fa.curves([CurveRequest(p, h, int(t), substrate="constant") for p, h, t in zip(pixels, heats, y)],
                     predict, steps=steps)
    metric = quantus.PixelFlipping(features_in_step=12, perturb_baseline=0.0,
                                   disable_warnings=True, abs=False, normalise=False)
    theirs = metric(model=model, x_batch=x, y_batch=y, a_batch=heats[:, None], device="cpu", softmax=True)
    for curve, q in zip(ours, theirs):
        np.testing.assert_allclose(curve.probs[1:], q, atol=1e-5)


# ------------------------------------------------------------------ focus.max_deletion_auc end to end

def _curve_spec(pytester, focus: dict, n: int = 2) -> None:
    import json
    import shutil
    from pathlib import Path

    import yaml

    shapes = Path(__file__).resolve().parents[1] / "specs" / "shapes" / "images"
    boxes = sorted(json.loads((shapes / "boxes.json").read_text()).items())[:n]
    cases = []
    for name, meta in boxes:
        shutil.copy(shapes / name, pytester.path / name)
        cases.append({"id": name[:-4], "image": name, "focus": dict(focus)})
    (pytester.path / "c.yaml").write_text(yaml.safe_dump({"model": {"arch": "shapes_vgg"}, "cases": cases},
                                                         sort_keys=False))


def test_deletion_and_insertion_metrics_need_no_region_and_land_in_results(pytester):
    import json

    _curve_spec(pytester, {"max_deletion_auc": 0.5, "min_insertion_auc": 0.5, "curve_steps": 8})
    result = pytester.runpytest("-p", "no:cacheprovider", "--audit-report", "rep")
    result.assert_outcomes(passed=2)
    # the curve steps are predicted after the explaining forward, which stays one per batch
    result.stdout.fnmatch_lines(["*2 images in 1 forward pass*"])
    data = json.loads((pytester.path / "rep" / "results.json").read_text())
    for case in data["cases"]:
        curves = case["kinds"]["focus"]["curves"]
        assert [c["mode"] for c in curves] == ["deletion", "insertion"]
        for c in curves:
            assert len(c["probs"]) == 9 and 0.0 <= c["auc"] <= 1.0
            assert c["auc"] == pytest.approx(fa.normalised_auc(c["probs"]))
        focus = next(ch for ch in case["checks"] if ch["kind"] == "focus")
        assert [m["name"] for m in focus["metrics"]] == ["deletion_auc", "insertion_auc"]
    assert (pytester.path / "rep" / "index.html").read_text().count("<polyline") == 4


def test_a_deletion_ceiling_below_the_curve_fails_with_the_numbers(pytester):
    _curve_spec(pytester, {"max_deletion_auc": 0.01}, n=1)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*deletion_auc=* <= 0.01 FAIL: p(*) as the hottest pixels are inpainted away "
                                 "in 16 steps: *"])
    assert "Traceback" not in result.stdout.str()
