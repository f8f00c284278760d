"""The shipped specs do what the README promises: shapes pass offline, the shortcut model is caught."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def outcomes_by_item(pytester: pytest.Pytester, target: Path, *args: str) -> dict[str, str]:
    result = pytester.runpytest(str(target), "--junitxml=out.xml", "-p", "no:cacheprovider", *args)
    outcomes = {}
    for case in ET.parse(pytester.path / "out.xml").getroot().iter("testcase"):
        children = {child.tag for child in case}
        outcome = ("failed" if "failure" in children else "error" if "error" in children
                   else "skipped" if "skipped" in children else "passed")
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    assert outcomes, result.stdout.str()
    return outcomes


def test_shipped_shapes_specs_all_pass_offline(pytester):
    outcomes = outcomes_by_item(pytester, REPO / "specs" / "shapes")
    assert len([k for k in outcomes if k.endswith("prediction")]) >= 12
    assert len([k for k in outcomes if k.endswith("focus")]) >= 12
    assert len([k for k in outcomes if k.endswith("invariance")]) >= 12
    assert set(outcomes.values()) == {"passed"}, outcomes


def test_shortcut_model_gets_the_label_right_for_the_wrong_reason(pytester):
    outcomes = outcomes_by_item(pytester, REPO / "examples" / "shortcut")
    predictions = {k: v for k, v in outcomes.items() if k.endswith("prediction")}
    focus = {k: v for k, v in outcomes.items() if k.endswith("focus")}
    assert len(predictions) >= 6 and len(focus) == len(predictions)
    assert set(predictions.values()) == {"passed"}, predictions
    assert set(focus.values()) == {"failed"}, focus
    invariance = {k: v for k, v in outcomes.items() if k.endswith("invariance")}
    assert len(invariance) == len(predictions)
    assert set(invariance.values()) == {"failed"}, invariance


def test_shortcut_example_with_the_honest_model_passes_everything(pytester):
    """The example's comment: change `arch` to shapes_vgg and every item passes."""
    import shutil

    for folder in ("images", "markers"):
        shutil.copytree(REPO / "examples" / "shortcut" / folder, pytester.path / folder)
    text = (REPO / "examples" / "shortcut" / "shortcut.yaml").read_text()
    (pytester.path / "honest.yaml").write_text(text.replace("arch: shapes_vgg_shortcut", "arch: shapes_vgg"))
    outcomes = outcomes_by_item(pytester, pytester.path / "honest.yaml")
    assert len([k for k in outcomes if k.endswith("invariance")]) == 6
    assert set(outcomes.values()) == {"passed"}, outcomes


def test_imagenet_specs_skip_with_the_weights_file_to_provide(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MODEL_AUDIT_OFFLINE", "1")
    result = pytester.runpytest(str(REPO / "specs" / "imagenet"), "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    outcomes.pop("warnings", None)  # pytester in-process: "audit already imported, cannot be rewritten"
    assert outcomes.get("skipped", 0) >= 3 and set(outcomes) == {"skipped"}
    result.stdout.fnmatch_lines(["*did not run: weights vgg16 IMAGENET1K_V1 are not available offline: "
                                 "expected *vgg16-397923af.pth*"])
