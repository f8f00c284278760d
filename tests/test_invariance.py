"""The invariance check kind end to end: counterfactuals separate the shortcut model from the honest one."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from audit import perturb
from audit.zoo.scenes import CLASSES, MARKER_BOX, MARKER_COLOURS, SEED_RANGES, make_scene

REPO = Path(__file__).resolve().parents[1]
SHORTCUT = REPO / "examples" / "shortcut"

# imagecorruptions (scikit-image, C extensions) imported here, outside the pytester runs, which restore
# sys.modules afterwards: a C extension imported for the first time inside one would be imported again
perturb.corruption_names()

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")


def _copy_example(pytester: pytest.Pytester, arch: str | None = None) -> Path:
    shutil.copytree(SHORTCUT / "images", pytester.path / "images")
    shutil.copytree(SHORTCUT / "markers", pytester.path / "markers")
    text = (SHORTCUT / "shortcut.yaml").read_text()
    if arch:
        text = text.replace("arch: shapes_vgg_shortcut", f"arch: {arch}")
    path = pytester.path / "shortcut.yaml"
    path.write_text(text)
    return path


def _invariance_reports(result: pytest.RunResult) -> dict[str, str]:
    reports = {}
    for rep in result.getreports("pytest_runtest_logreport"):
        if rep.when == "call" and rep.nodeid.endswith("::invariance"):
            reports[rep.nodeid] = rep.outcome + "\n" + (str(rep.longrepr) if rep.failed else "")
    return reports


def test_shortcut_example_fails_every_invariance_item_naming_the_flip(pytester):
    _copy_example(pytester)
    result = pytester.inline_run("-p", "no:cacheprovider")
    reports = _invariance_reports(result)
    assert len(reports) == 6
    for nodeid, text in reports.items():
        assert text.startswith("failed"), nodeid
        # the paste of another class's marker flips the top-1 to that class, and the message says so
        assert re.search(r"top-1 (\w+) 0\.\d\d -> (\w+) 0\.\d\d when markers/\2\.png is pasted at \[2, 2\]: "
                         r"the top-1 changed", text), text
        assert "when the avoid region is inpainted" in text
        assert "Traceback" not in text


def test_shortcut_example_with_the_honest_model_passes_every_invariance_item(pytester):
    _copy_example(pytester, arch="shapes_vgg")
    result = pytester.inline_run("-p", "no:cacheprovider")
    reports = _invariance_reports(result)
    assert len(reports) == 6
    assert all(text.startswith("passed") for text in reports.values()), reports


def test_variants_share_the_originals_forward_pass(pytester):
    _copy_example(pytester)
    result = pytester.runpytest("-p", "no:cacheprovider", "--audit-batch-size", "16")
    # 6 cases x 3 perturbations: still one forward for the batch
    result.stdout.fnmatch_lines(["*6 images in 1 forward pass*"])


def _marked_scenes(pytester: pytest.Pytester, n: int, offset: int) -> list[tuple[str, object]]:
    lo, _ = SEED_RANGES["tests"]
    (pytester.path / "images").mkdir(exist_ok=True)
    out = []
    for seed in range(lo + offset, lo + offset + n):
        scene = make_scene(seed, marker=True)
        name = f"scene-{seed}.png"
        scene.image.save(pytester.path / "images" / name)
        out.append((name, scene))
    for k, colour in enumerate(MARKER_COLOURS):
        Image.new("RGB", (6, 6), colour).save(pytester.path / "images" / f"marker-{CLASSES[k]}.png")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch,expected", [("shapes_vgg", "passed"), ("shapes_vgg_shortcut", "failed")])
def test_unseen_marked_scenes_separate_the_two_models(pytester, arch, expected):
    """Scenes from the tests' seed range (never shipped, never trained on): hiding the marker and
    pasting another class's marker keep the honest model's top-1 and break the shortcut's."""
    scenes = _marked_scenes(pytester, 12, offset=7000)
    cases = []
    for name, scene in scenes:
        other = CLASSES[(scene.label + 3) % len(CLASSES)]
        cases.append({"id": Path(name).stem, "image": f"images/{name}",
                      "focus": {"region": {"box": list(scene.box)}, "avoid": {"box": list(MARKER_BOX)}},
                      "invariance": [{"occlude": "avoid"},
                                     {"paste": {"image": f"images/marker-{other}.png", "at": [2, 2]},
                                      "expect": {"same_top1": True, "max_prob_drop": 0.2}}]})
    spec = {"model": {"arch": arch}, "cases": cases}
    (pytester.path / "unseen.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = pytester.inline_run("-p", "no:cacheprovider", "-k", "invariance")
    reports = _invariance_reports(result)
    assert len(reports) == 12
    assert [t.split("\n")[0] for t in reports.values()] == [expected] * 12


def _one_case(pytester, invariance, focus=None, extra_files=()) -> Path:
    shutil.copy(SHORTCUT / "images" / "circle-01.png", pytester.path / "circle.png")
    case = {"id": "c", "image": "circle.png", "invariance": invariance}
    if focus:
        case["focus"] = focus
    path = pytester.path / "one.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "shapes_vgg"}, "cases": [case]}, sort_keys=False))
    return path


@pytest.mark.parametrize("entry,message", [
    ({"jpeg": 40, "hflip": True}, "exactly one transform"),
    ({"fill": "inpaint"}, "exactly one transform"),
    ({"jpeg": 40, "expect": {"min_heatmap_follows": 0.7}}, "min_heatmap_follows applies to geometric transforms (hflip), not jpeg"),
    ({"jpeg": 40, "fill": "mean"}, "fill applies to occlude, not jpeg"),
    ({"brightness": 0.7, "expect": {"min_prob_drop": 0.5, "max_prob_drop": 0.2}}, "nothing can pass"),
    ({"paste": {"image": "nope.png", "at": [0, 0]}}, "nope.png"),
    ({"corruption": {"name": "gausian_noise", "severity": 2}}, "did you mean: 'gaussian_noise'"),
    ({"jpeg": 400}, "one.yaml:"),
])
def test_bad_invariance_entries_are_one_line_spec_errors_at_the_entry(pytester, entry, message):
    _one_case(pytester, [entry])
    result = pytester.runpytest("-p", "no:cacheprovider")
    out = result.stdout.str()
    assert message in out, out
    assert re.search(r"one\.yaml:\d+", out), out
    assert "Traceback" not in out


def test_occlude_avoid_without_an_avoid_region_names_what_is_missing(pytester):
    _one_case(pytester, [{"occlude": "avoid"}])
    result = pytester.runpytest("-p", "no:cacheprovider")
    out = result.stdout.str()
    assert "occlude: avoid needs focus.avoid" in out, out
    assert "Traceback" not in out


def test_results_json_carries_every_number(pytester):
    _one_case(pytester, [{"occlude": {"box": [2, 2, 8, 8]}, "fill": "mean"},
                         {"hflip": True, "expect": {"same_top1": True, "min_heatmap_follows": 0.5}},
                         {"gaussian_blur": 1.0}, {"corruption": {"name": "gaussian_noise", "severity": 1}}])
    pytester.runpytest("-p", "no:cacheprovider", "--audit-report", "rep")
    data = json.loads((pytester.path / "rep" / "results.json").read_text())
    case = next(c for c in data["cases"] if c["case_id"] == "c")
    rows = case["kinds"]["invariance"]["perturbations"]
    assert [r["transform"] for r in rows] == ["occlude", "hflip", "gaussian_blur", "corruption"]
    for r in rows:
        assert r["top1_before"]["label"] == "circle" and 0 <= r["top1_after"]["prob"] <= 1
        assert isinstance(r["prob_drop"], float) and isinstance(r["passed"], bool)
        assert r["prob_drop"] == pytest.approx(r["top1_before"]["prob"] - r["prob_after_of_original_top1"])
    assert 0.5 <= rows[1]["heatmap_follows"] <= 1.0
    assert rows[0]["describe"] == "box [2, 2, 8, 8] is filled with its surroundings' mean colour"
    html = (pytester.path / "rep" / "index.html").read_text()
    assert "the image is flipped horizontally" in html
