"""A tampered baseline is an error of its own case's ``::baseline`` item only, naming the file.

Each tampering seen in a red-team run (an index the model does not have, ``top_k`` of plain numbers,
``1e400``, NaN, JSON nested 100 000 deep, an ``.npy`` header claiming 2 TB, a ``(0, 5)`` array) is
refused by ``BaselineStore.load`` with one line before anything is allocated; through the plugin the
other checks of that case and every other case still pass. Leftover temp files of a killed recording
are not recordings, and the next recording removes them.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from audit import baselines as B
from audit.errors import AuditError, ModelError
from audit.models import Categories

from .conftest import assert_no_traceback, good_cases, item_outcomes, write_spec

HEAT = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 0.125]], dtype=np.float16)


def recorded(tmp_path: Path) -> B.BaselineStore:
    spec = tmp_path / "s.yaml"
    spec.write_text("cases: []\n")
    store = B.BaselineStore(spec)
    store.save(B.Baseline(case_id="c", top_k=[{"index": 1, "label": "ring", "prob": 0.9}], target=1, heatmap=HEAT,
                          image_sha256="a" * 64, model_fingerprint="f" * 64, preprocess="squash",
                          cam_layer="features.3", versions={"torch": "2"}, recorded_at="2026-01-01T00:00:00+00:00"))
    return store


def edit_json(store: B.BaselineStore, change) -> Path:
    path = store.folder / "c.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


JSON_TAMPERING = {
    "top_k of numbers": (lambda d: d.update(top_k=[1, 2, 3]), r"top_k\[0\]: 1 is not of type 'object'"),
    "huge target": (lambda d: d.update(target="__1e400__"), r"number 1e400 is out of range"),
    "NaN prob": (lambda d: d["top_k"][0].update(prob="__NaN__"), r"NaN is not a number JSON allows"),
    "prob above 1": (lambda d: d["top_k"][0].update(prob=1.5), r"top_k\[0\]\.prob: 1\.5 is greater than"),
    "negative index": (lambda d: d["top_k"][0].update(index=-1), r"top_k\[0\]\.index: -1 is less than"),
    "float target": (lambda d: d.update(target=1.5), r"target: 1\.5 is not of type 'integer'"),
    "empty heatmap shape": (lambda d: d["heatmap"].update(shape=[0, 5]), r"heatmap\.shape\[0\]: 0 is less than"),
    "versions not text": (lambda d: d.update(versions={"torch": {"a": 1}}), r"versions\.torch"),
    "duplicate classes": (lambda d: d.update(top_k=d["top_k"] * 2), r"a class is listed twice"),
}


@pytest.mark.parametrize("name", list(JSON_TAMPERING))
def test_each_tampered_field_is_refused_with_the_file_and_field_named(tmp_path, name):
    change, message = JSON_TAMPERING[name]
    store = recorded(tmp_path)
    path = edit_json(store, change)
    text = path.read_text().replace('"__1e400__"', "1e400").replace('"__NaN__"', "NaN")
    path.write_text(text)
    with pytest.raises(AuditError, match=message) as info:
        store.load("c")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_class_index_the_model_lacks_is_refused_where_the_label_count_is_known(tmp_path):
    store = recorded(tmp_path)
    edit_json(store, lambda d: d.update(target=99))
    assert store.load("c").target == 99   # without the model the index cannot be judged
    with pytest.raises(AuditError, match=r"c\.json cannot be used: target is class 99, but the model has 8 "
                                         r"classes \(0\.\.7\)"):
        store.load("c", num_classes=8)


def test_json_nested_deeper_than_the_parser_is_refused(tmp_path):
    store = recorded(tmp_path)
    (store.folder / "c.json").write_text("[" * 100_000)
    with pytest.raises(AuditError, match="nested too deeply"):
        store.load("c")


def test_a_huge_json_file_is_not_read(tmp_path):
    store = recorded(tmp_path)
    with open(store.folder / "c.json", "wb") as fh:
        fh.truncate(B.MAX_JSON_BYTES * 50)
    with pytest.raises(AuditError, match="not a baseline file"):
        store.load("c")


def npy_with_header(shape: tuple, dtype: str = "<f2", data: bytes = b"") -> bytes:
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data   # the writer puts the magic string first


@pytest.mark.parametrize("header, message", [
    ((1_000_000, 1_000_000), r"is 1000000x1000000 but the baseline JSON says 2x3"),   # a 2 TB claim
    ((0, 5), r"is 0x5 but the baseline JSON says 2x3"),
    ((2, 3, 1), r"expected a 2-D float16 heatmap"),
    ((2, 3), r"holds 0 bytes of data, its header says 12"),
])
def test_an_npy_header_that_does_not_match_is_refused_before_reading(tmp_path, header, message):
    store = recorded(tmp_path)
    (store.folder / "c.npy").write_bytes(npy_with_header(header))
    with pytest.raises(AuditError, match=message) as info:
        store.load("c")
    assert "c.npy" in str(info.value)


def test_an_npy_of_another_dtype_or_with_nan_is_refused(tmp_path):
    store = recorded(tmp_path)
    np.save(store.folder / "c.npy", HEAT.astype(np.float32))
    with pytest.raises(AuditError, match="expected a 2-D float16 heatmap"):
        store.load("c")
    bad = HEAT.copy()
    bad[0, 0] = np.nan
    np.save(store.folder / "c.npy", bad)
    with pytest.raises(AuditError, match="outside 0..1"):
        store.load("c")


def test_an_npy_claiming_a_pickled_object_is_refused(tmp_path):
    store = recorded(tmp_path)
    (store.folder / "c.npy").write_bytes(npy_with_header((2, 3), dtype="|O"))
    with pytest.raises(AuditError, match="c.npy cannot be used"):
        store.load("c")


def test_an_untouched_recording_still_loads_exactly(tmp_path):
    loaded = recorded(tmp_path).load("c", num_classes=8)
    np.testing.assert_array_equal(loaded.heatmap, HEAT)
    assert loaded.top_k == [{"index": 1, "label": "ring", "prob": 0.9}] and loaded.target == 1


def test_a_lone_temp_file_is_not_a_recording_and_the_next_recording_removes_stale_ones(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("cases: []\n")
    store = B.BaselineStore(spec)
    store.folder.mkdir(parents=True)
    stale = store.folder / ".tmp-0123456789ab.json"
    fresh = store.folder / ".tmp-ba9876543210.json"   # another worker's, mid-write
    stale.write_text("{")
    fresh.write_text("{")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert not store.exists()
    recorded(tmp_path)
    assert store.exists() and not stale.exists() and fresh.exists()


def test_a_labels_file_nested_too_deeply_is_a_model_error(tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text("[" * 100_000)
    with pytest.raises(ModelError, match=r"labels file .*labels\.json: nested too deeply"):
        Categories.from_file(labels)


def test_through_the_plugin_a_tampered_baseline_errors_only_its_own_baseline_item(pytester, scenes):
    cases = good_cases(scenes) + [{**good_cases(scenes)[0], "id": "third"}]
    write_spec(pytester, "s.yaml", cases)
    pytester.runpytest("--audit-update-baselines", "-p", "no:cacheprovider").assert_outcomes(passed=9)
    path = pytester.path / "baselines" / "s" / "third.json"
    data = json.loads(path.read_text())
    data["target"] = 99
    path.write_text(json.dumps(data))
    result = pytester.runpytest("-p", "no:cacheprovider", "--audit-report", "reports")
    outcomes = item_outcomes(result)
    assert outcomes.pop("s.yaml::third::baseline") == "error"
    assert set(outcomes.values()) == {"passed"} and len(outcomes) == 8
    out = result.stdout.str()
    assert "baselines/s/third.json cannot be used: target is class 99" in out
    assert "unknown label" not in out
    assert_no_traceback(result)
    report = json.loads((pytester.path / "reports" / "results.json").read_text())
    assert report["run"]["counts"] == {"passed": 8, "failed": 0, "skipped": 0, "error": 1}
