"""Baselines through the plugin: record → pass → change → fail → re-record (pytest-regressions' cycle)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MARKER_SCENES = REPO / "examples" / "shortcut" / "images"


@pytest.fixture
def spec(pytester: pytest.Pytester) -> Path:
    """Marker scenes, on which shapes_vgg looks at the object and the shortcut twin at the marker."""
    shutil.copytree(MARKER_SCENES, pytester.path / "images")
    boxes = json.loads((MARKER_SCENES / "boxes.json").read_text())
    cases = [{"id": Path(name).stem, "image": f"images/{name}", "expect": {"top1": meta["label"]}}
             for name, meta in sorted(boxes.items())][:4]
    path = pytester.path / "upgrade.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "shapes_vgg"}, "cases": cases}, sort_keys=False))
    return path


def switch_model(spec: Path, arch: str) -> None:
    data = yaml.safe_load(spec.read_text())
    data["model"]["arch"] = arch
    spec.write_text(yaml.safe_dump(data, sort_keys=False))


def test_without_recorded_baselines_no_baseline_item_exists(pytester, spec):
    result = pytester.runpytest("--collect-only", "-q")
    assert not [line for line in result.outlines if line.endswith("::baseline")]


def test_record_then_compare_passes_and_files_are_reviewable(pytester, spec):
    pytester.runpytest("--audit-update-baselines").assert_outcomes(passed=8)
    folder = pytester.path / "baselines" / "upgrade"
    record = json.loads((folder / "circle-01.json").read_text())
    assert record["case_id"] == "circle-01" and len(record["image_sha256"]) == 64
    assert {"torch", "torchvision"} <= set(record["versions"]) and record["model_fingerprint"]
    import numpy as np

    heat = np.load(folder / "circle-01.npy")
    assert heat.dtype == np.float16 and heat.shape == (16, 16)
    pytester.runpytest().assert_outcomes(passed=8)


def test_switching_to_the_shortcut_model_fails_on_heatmap_correlation_and_report_shows_both(pytester, spec):
    pytester.runpytest("--audit-update-baselines").assert_outcomes(passed=8)
    switch_model(spec, "shapes_vgg_shortcut")
    result = pytester.runpytest("--audit-report", "reports")
    result.assert_outcomes(passed=4, failed=4)  # same labels, different reasons
    out = result.stdout.str()
    assert "heatmap_correlation=" in out and "FAIL" in out
    assert "model changed since the baseline: fingerprint" in out
    data = json.loads((pytester.path / "reports" / "results.json").read_text())
    for case in data["cases"]:
        baseline = next(c for c in case["checks"] if c["kind"] == "baseline")
        assert baseline["outcome"] == "failed"
        corr = next(m for m in baseline["metrics"] if m["name"] == "heatmap_correlation")
        assert corr["passed"] is False
        deltas = case["kinds"]["baseline"]
        assert deltas["top1_then"].split(")")[0] == deltas["top1_now"].split(")")[0]
        for rel in (case["assets"]["heatmap"], case["assets"]["kinds"]["baseline"]["heatmap"]):
            assert (pytester.path / "reports" / rel).is_file()
    html = (pytester.path / "reports" / "index.html").read_text()
    assert "baseline heatmap" in html


def test_a_changed_image_is_a_stale_baseline_not_a_pass(pytester, spec):
    pytester.runpytest("--audit-update-baselines").assert_outcomes(passed=8)
    image = pytester.path / "images" / "circle-01.png"
    from PIL import Image

    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    result = pytester.runpytest("-k", "circle")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*image changed since the baseline was recorded*"])


def test_a_case_added_after_recording_is_skipped_and_strict_makes_it_an_error(pytester, spec):
    pytester.runpytest("--audit-update-baselines").assert_outcomes(passed=8)
    data = yaml.safe_load(spec.read_text())
    data["cases"].append({**data["cases"][0], "id": "new-case"})
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    result = pytester.runpytest("-k", "new-case", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*no baseline for new-case*record it with --audit-update-baselines*"])
    pytester.runpytest("-k", "new-case", "--audit-strict").assert_outcomes(passed=1, errors=1)


def test_recording_under_xdist_writes_every_baseline(pytester, spec):
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--audit-update-baselines")
    assert result.parseoutcomes() == {"passed": 8}
    assert len(list((pytester.path / "baselines" / "upgrade").glob("*.json"))) == 4
    pytester.runpytest().assert_outcomes(passed=8)
