"""Baselines: exact, reviewable files per case; metrics that never return NaN; comparisons that read
like assertions (then vs now) and never pass silently on a stale recording."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from audit import baselines as B
from audit.errors import AuditError
from audit.baselines import BaselineTolerance

HEAT = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 0.125]], dtype=np.float32)


def make(case_id="circle-01", top=((0, "circle", 0.9), (3, "ring", 0.05), (5, "star", 0.03)), heat=HEAT,
         sha="a" * 64, fp="1234abcd" + "0" * 56, versions=None, target=None, probs=None) -> B.Baseline:
    top_k = [{"index": i, "label": lab, "prob": p} for i, lab, p in top]
    return B.Baseline(case_id=case_id, top_k=top_k, target=top[0][0] if target is None else target,
                      heatmap=np.asarray(heat, np.float32).astype(np.float16), image_sha256=sha,
                      model_fingerprint=fp, preprocess="squash", cam_layer="features.29",
                      versions=versions or {"torch": "2.3.0", "torchvision": "0.18.0", "model_audit": "0.1.0"},
                      recorded_at="2024-05-01T10:00:00+00:00", probs=probs)


@pytest.fixture
def store(tmp_path: Path) -> B.BaselineStore:
    spec = tmp_path / "specs" / "basic.yaml"
    spec.parent.mkdir()
    spec.write_text("cases: []\n")
    return B.BaselineStore(spec)


# --------------------------------------------------------------------------------------- storage

def test_store_lives_beside_the_spec_one_pair_of_files_per_case(store, tmp_path):
    assert store.folder == tmp_path / "specs" / "baselines" / "basic"
    assert not store.exists()
    written = store.save(make())
    assert written.paths == [store.folder / "circle-01.json", store.folder / "circle-01.npy"] and written.changed
    assert store.exists()
    assert sorted(p.name for p in store.folder.iterdir()) == ["circle-01.json", "circle-01.npy"]


def test_round_trip_keeps_every_field_and_a_float16_heatmap(store):
    original = make()
    store.save(original)
    loaded = store.load("circle-01")
    assert loaded.heatmap.dtype == np.float16
    np.testing.assert_array_equal(loaded.heatmap, original.heatmap)
    for name in ("case_id", "top_k", "target", "image_sha256", "model_fingerprint", "preprocess", "cam_layer",
                 "versions", "recorded_at"):
        assert getattr(loaded, name) == getattr(original, name), name


def test_json_is_reviewable_sorted_indented_rounded(store):
    store.save(make(top=((0, "circle", 0.123456789), (3, "ring", 0.05))))
    text = (store.folder / "circle-01.json").read_text()
    data = json.loads(text)
    assert sorted(data) == ["cam_layer", "case_id", "heatmap", "image_sha256", "model_fingerprint", "preprocess",
                            "recorded_at", "schema_version", "target", "top_k", "versions"]
    assert list(data) == sorted(data)
    assert text.startswith('{\n  "cam_layer"')
    assert data["top_k"][0] == {"index": 0, "label": "circle", "prob": 0.123457}
    assert data["heatmap"] == {"dtype": "float16", "file": "circle-01.npy", "shape": [2, 3]}
    assert data["target"] == 0 and data["schema_version"] == 1
    assert data["versions"] == {"model_audit": "0.1.0", "torch": "2.3.0", "torchvision": "0.18.0"}


def test_missing_baseline_loads_as_none(store):
    assert store.load("never-recorded") is None


@pytest.mark.parametrize("case_id", ["chat/noir", "café ☕", "../../etc/passwd", ".hidden", "a b", ""])
def test_unsafe_ids_get_a_safe_name_with_a_hash_and_keep_the_real_id(store, case_id):
    stem = B.safe_case_id(case_id)
    assert stem and all(c.isascii() and (c.isalnum() or c in "._-") for c in stem)
    assert not stem.startswith(".")
    digest = hashlib.sha1(case_id.encode()).hexdigest()[:10]
    assert stem == digest or stem.endswith("-" + digest)
    store.save(make(case_id=case_id))
    json_path, _ = store.paths(case_id)
    assert json_path.parent == store.folder
    assert json.loads(json_path.read_text())["case_id"] == case_id
    assert store.load(case_id).case_id == case_id


def test_safe_ids_keep_plain_ids_and_separate_lookalikes():
    assert B.safe_case_id("circle-01.v2_a") == "circle-01.v2_a"
    assert B.safe_case_id("a/b") != B.safe_case_id("a_b")
    assert B.safe_case_id("a/b") != B.safe_case_id("a\\b")
    assert B.safe_case_id("a/b").startswith("a_b-")


def test_corrupt_json_is_an_audit_error_naming_the_file(store):
    store.save(make())
    path = store.folder / "circle-01.json"
    path.write_text("{ not json")
    with pytest.raises(AuditError, match=r"baseline .*circle-01\.json cannot be used.*--audit-update-baselines"):
        store.load("circle-01")


def test_json_missing_fields_or_wrong_case_is_an_audit_error(store):
    store.save(make())
    path = store.folder / "circle-01.json"
    data = json.loads(path.read_text())
    del data["top_k"]
    path.write_text(json.dumps(data))
    with pytest.raises(AuditError, match="top_k"):
        store.load("circle-01")
    data = json.loads(json.dumps(make(case_id="other").to_json("circle-01.npy")))
    path.write_text(json.dumps(data))
    with pytest.raises(AuditError, match="holds case 'other'"):
        store.load("circle-01")


def test_corrupt_or_missing_heatmap_is_an_audit_error_naming_the_npy(store):
    store.save(make())
    npy = store.folder / "circle-01.npy"
    npy.write_bytes(b"garbage")
    with pytest.raises(AuditError, match=r"circle-01\.npy"):
        store.load("circle-01")
    npy.unlink()
    with pytest.raises(AuditError, match=r"circle-01\.npy.*file not found"):
        store.load("circle-01")


def test_save_leaves_no_temp_files_and_overwrites(store):
    store.save(make())
    store.save(make(top=((3, "ring", 0.7),)))
    assert sorted(p.name for p in store.folder.iterdir()) == ["circle-01.json", "circle-01.npy"]
    assert store.load("circle-01").top_k[0]["label"] == "ring"


def test_sha256_file(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    assert B.sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_from_explanation_takes_the_target_map_and_full_probs(tmp_path):
    img = tmp_path / "i.png"
    img.write_bytes(b"png")
    ranked = [SimpleNamespace(index=2, label="b", prob=0.7), SimpleNamespace(index=0, label="a", prob=0.2)]
    e = SimpleNamespace(top_k=ranked, target=2, cams_lowres={2: HEAT, 0: HEAT * 0}, cam_layer="features.3",
                        probs=np.array([0.2, 0.1, 0.7]))
    b = B.Baseline.from_explanation("c", e, img, "f" * 64, "squash")
    assert b.target == 2 and b.heatmap.dtype == np.float16 and b.image_sha256 == B.sha256_file(img)
    assert b.top_k == [{"index": 2, "label": "b", "prob": 0.7}, {"index": 0, "label": "a", "prob": 0.2}]
    assert set(b.versions) == {"torch", "torchvision", "model_audit"}
    assert B.Baseline.from_explanation("c", e, img, "f", "squash", target=0).target == 0
    assert B.Baseline.from_explanation("c", e, img, "f", "squash", target=7).target == 2  # no map for 7


def test_baselines_module_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, audit.baselines; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------------------- metrics

def test_pearson_hand_computed():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert B.pearson(a, a) == pytest.approx(1.0)
    assert B.pearson(a, -a) == pytest.approx(-1.0)
    b = np.array([[1.0, 3.0], [2.0, 4.0]])   # deviations (-1.5,-.5,.5,1.5) vs (-1.5,.5,-.5,1.5): 4/5
    assert B.pearson(a, b) == pytest.approx(0.8)


def test_pearson_constant_maps_never_nan():
    z, o = np.zeros((3, 3)), np.ones((3, 3))
    assert B.pearson(z, z) == 1.0
    assert B.pearson(z, o) == 0.0
    assert B.pearson(z, np.eye(3)) == 0.0
    assert B.pearson(np.eye(3), z) == 0.0
    assert not math.isnan(B.pearson(np.full((2, 2), np.nan), z))


def test_pearson_resizes_the_second_map_to_the_first():
    a = np.outer(np.arange(4.0), np.ones(4))
    b = np.outer(np.arange(8.0), np.ones(8))
    assert B.pearson(a, b) == pytest.approx(1.0, abs=1e-6)


def test_hot_iou_hand_computed():
    a = np.array([[1.0, 0.6, 0.0, 0.0]])   # hot: 0, 1
    b = np.array([[0.0, 1.0, 0.9, 0.0]])   # hot: 1, 2
    assert B.hot_iou(a, b) == pytest.approx(1 / 3)
    assert B.hot_iou(a, a) == 1.0
    assert B.hot_iou(a, b, fraction=1.0) == 0.0


def test_hot_iou_empty_maps():
    z = np.zeros((2, 2))
    assert B.hot_iou(z, z) == 1.0
    assert B.hot_iou(z, np.eye(2)) == 0.0


def test_topk_overlap_is_the_share_of_the_baseline_still_present():
    assert B.topk_overlap([1, 2, 3, 4, 5], [5, 4, 9, 8, 1]) == pytest.approx(3 / 5)
    assert B.topk_overlap([1, 2], [2, 1]) == 1.0
    assert B.topk_overlap([1, 2], [7, 8]) == 0.0
    assert B.topk_overlap([], [1]) == 1.0


def test_prob_drift_is_the_largest_change_over_the_baseline_classes():
    then = [{"index": 0, "label": "a", "prob": 0.9}, {"index": 3, "label": "b", "prob": 0.05}]
    assert B.prob_drift(then, {0: 0.7, 3: 0.25}) == pytest.approx(0.2)
    assert B.prob_drift(then, {0: 0.9, 3: 0.05}) == 0.0
    assert B.prob_drift(then, {3: 0.05}) == pytest.approx(0.9)   # absent today: counted as 0


# --------------------------------------------------------------------------------------- compare

def test_identical_observation_passes_every_comparison():
    result = B.compare(make(), make(), BaselineTolerance())
    assert result.kind == "baseline" and result.passed
    assert [m.name for m in result.metrics] == ["top1", "topk_overlap", "prob_drift", "heatmap_correlation",
                                                "hot_iou"]
    assert all(m.passed for m in result.metrics)
    assert result.message.startswith("baseline: matches (recorded 2024-05-01")
    assert "model changed" not in result.message


def test_default_tolerance_is_the_specs():
    assert B.compare(make(), make()).passed


def test_top1_flip_fails_with_then_and_now():
    now = make(top=((3, "ring", 0.6), (0, "circle", 0.3), (5, "star", 0.03)), target=3)
    result = B.compare(make(), now, BaselineTolerance())
    assert not result.passed
    top1 = result.metrics[0]
    assert (top1.name, top1.value, top1.threshold, top1.passed) == ("top1", 3, 0, False)
    assert "then 'circle' (#0) p=0.900, now 'ring' (#3) p=0.600" in result.message
    assert "prob_drift=0.60 <= 0.15 FAIL" in result.message
    assert "p('circle' (#0)) 0.900 → 0.300" in result.message
    assert result.message.splitlines()[0].startswith("baseline: 2 of 5 comparisons failed")


def test_top1_flip_allowed_when_tolerance_says_so():
    now = make(top=((3, "ring", 0.46), (0, "circle", 0.45), (5, "star", 0.03)))
    tol = SimpleNamespace(top1_must_match=False, min_topk_overlap=0.6, max_prob_drift=0.5,
                          min_heatmap_correlation=0.7, min_hot_iou=0.4)
    assert B.compare(make(), now, tol).passed


def test_changed_image_fails_as_stale_even_when_everything_else_matches():
    result = B.compare(make(sha="abc" + "0" * 61), make(sha="def" + "1" * 61), BaselineTolerance())
    assert not result.passed
    first = result.message.splitlines()[0]
    assert ("image changed since the baseline was recorded (sha256 abc00000… → def11111…): "
            "re-record with --audit-update-baselines") in first


def test_changed_model_with_same_outputs_passes_and_says_what_changed():
    now = make(fp="9876fedc" + "1" * 56, versions={"torch": "2.14.1", "torchvision": "0.18.0",
                                                   "model_audit": "0.1.0"})
    result = B.compare(make(), now, BaselineTolerance())
    assert result.passed
    assert "model changed since the baseline: fingerprint 1234abcd → 9876fedc; torch 2.3.0 → 2.14.1" \
        in result.message


def test_moved_heatmap_fails_correlation_and_hot_iou():
    moved = np.array([[1.0, 0.75, 0.125], [0.25, 0.0, 0.5]])
    result = B.compare(make(), make(heat=moved), BaselineTolerance())
    assert not result.passed
    names = {m.name for m in result.metrics if not m.passed}
    assert names == {"heatmap_correlation", "hot_iou"}
    assert "heatmap_correlation=" in result.message and "FAIL" in result.message


def test_class_leaving_the_top_k_uses_todays_full_softmax():
    then = make()
    now = make(top=((0, "circle", 0.9), (3, "ring", 0.05), (7, "moon", 0.04)),
               probs=np.array([0.9, 0, 0, 0.05, 0, 0.01, 0, 0.04]))
    result = B.compare(then, now, BaselineTolerance())
    drift = [m for m in result.metrics if m.name == "prob_drift"][0]
    assert drift.value == pytest.approx(0.02)
    overlap = [m for m in result.metrics if m.name == "topk_overlap"][0]
    assert overlap.value == pytest.approx(2 / 3) and overlap.passed


def test_deltas_feed_the_report():
    d = B.deltas(make(), make())
    assert d["heatmap_correlation"] == pytest.approx(1.0) and d["hot_iou"] == 1.0
    assert d["top1_then"] == d["top1_now"] == "circle (#0) 0.900"
    assert d["prob_drift"] == 0.0 and d["topk_overlap"] == 1.0
    assert d["recorded_with"]["torch"] == "2.3.0" and d["recorded_with"]["fingerprint"] == "1234abcd0000"
    json.dumps(d)   # JSON-ready
