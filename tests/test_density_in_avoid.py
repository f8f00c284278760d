"""The avoid region measured fairly (issue 13, item 4): heat density relative to the image's mean."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def marker_spec(pytester, arch: str) -> Path:
    shutil.copytree(REPO / "examples" / "shortcut" / "images", pytester.path / "images")
    boxes = json.loads((pytester.path / "images" / "boxes.json").read_text())
    cases = [{"id": Path(n).stem, "image": f"images/{n}", "focus": {"avoid": {"box": [2, 2, 8, 8]}}}
             for n in sorted(boxes)]
    spec = {"model": {"arch": arch}, "defaults": {"focus": {"max_energy_in_avoid": 0.2, "max_density_in_avoid": 2.0}},
            "cases": cases}
    path = pytester.path / "d.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_density_catches_the_marker_that_energy_in_avoid_lets_pass(pytester):
    marker_spec(pytester, "shapes_vgg_shortcut")
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "focus", "--audit-report", "r")
    out = result.stdout.str()
    assert result.parseoutcomes().get("failed") == 6, out[-3000:]
    assert "energy_in_avoid=0.0" in out and "ok" in out                 # the correlational metric passes
    assert "density_in_avoid=3." in out and "x the image's mean density" in out
    data = json.loads((pytester.path / "r" / "results.json").read_text())
    assert all(c["kinds"]["focus"]["density_in_avoid"] > 2.0 for c in data["cases"])


def test_the_honest_model_passes_the_same_density_ceiling(pytester):
    marker_spec(pytester, "shapes_vgg")
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "focus")
    result.assert_outcomes(passed=6)


def test_a_density_ceiling_without_an_avoid_region_is_a_spec_error(pytester):
    path = marker_spec(pytester, "shapes_vgg")
    data = yaml.safe_load(path.read_text())
    data["cases"][0]["focus"] = {"region": {"box": [10, 10, 40, 40]}, "max_density_in_avoid": 2.0}
    path.write_text(yaml.safe_dump(data))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*max_density_in_avoid needs an avoid region*"])
