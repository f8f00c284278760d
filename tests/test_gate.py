"""The gate as a new user meets it: the README's tutorial, regions the model never sees, what the
terminal and a CI screen (JUnit XML) show of a failure."""
from __future__ import annotations

import json
import re
import shutil
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from audit import regions
from audit.errors import SpecError
from audit.images import Preprocessing

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "specs" / "shapes" / "images"

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")


def tutorial_spec() -> str:
    """The YAML of the README's tutorial, step 3, exactly as printed there."""
    readme = (REPO / "README.md").read_text()
    step = readme[readme.index("3. Edit the spec"):]
    block = step[step.index("```yaml") + len("```yaml"):]
    return textwrap.dedent(block[:block.index("```")])


def photo(path: Path, size=(400, 300), seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def outcomes(result: pytest.RunResult) -> dict[str, int]:
    return {k: v for k, v in result.parseoutcomes().items() if k in ("passed", "failed", "errors", "error",
                                                                      "skipped")}


# -- the tutorial ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_tutorial_spec_runs_as_written_on_a_random_init_model(pytester, monkeypatch, tmp_path):
    """Only the weights change (the test machine has no ResNet-50 weights): every label resolves, every
    region is seen by the model, so each check runs and passes or fails; none errors or is skipped."""
    text = tutorial_spec()
    assert "weights: DEFAULT" in text
    spec = yaml.safe_load(text)
    assert spec["model"]["preprocess"] == "weights"
    (pytester.path / "animals.yaml").write_text(text.replace("weights: DEFAULT", "weights: null\n  seed: 0"))
    photo(pytester.path / "images" / "cat.jpg")
    monkeypatch.setenv("MODEL_AUDIT_OFFLINE", "1")
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
    counts = outcomes(result)
    assert counts.get("errors", 0) == counts.get("error", 0) == counts.get("skipped", 0) == 0, result.stdout.str()
    assert counts.get("passed", 0) + counts.get("failed", 0) == 2     # prediction and focus


def test_tutorial_regions_lie_inside_what_the_centre_crop_keeps():
    spec = yaml.safe_load(tutorial_spec())
    focus = spec["cases"][0]["focus"]
    crop = Preprocessing(mode="weights", size=224, resize=232, mean=(0.5,) * 3, std=(0.5,) * 3,
                         interpolation="bilinear")
    for w, h in [(400, 300), (300, 400), (640, 480), (500, 500)]:
        seen = regions.seen_box((w, h), crop)
        for role in ("region", "avoid"):
            mask = regions.region_mask(focus[role], (w, h), ".")
            regions.check_seen(mask, seen, regions.describe(focus[role]), role)   # raises if unseen


# -- regions the model never sees ------------------------------------------------------------------

@pytest.mark.parametrize("size", [(400, 300), (300, 400), (224, 224), (1000, 333), (257, 900), (64, 64)])
@pytest.mark.parametrize("resize, crop", [(256, 224), (232, 224), (342, 299), (224, 224)])
def test_seen_box_is_the_box_the_preprocessing_reports(size, resize, crop):
    prep = Preprocessing(mode="weights", size=crop, resize=resize, mean=(0.5,) * 3, std=(0.5,) * 3,
                         interpolation="bilinear")
    _, geometry = prep.to_tensor(Image.new("RGB", size))           # the oracle: what the engine uses
    assert regions.seen_box(size, prep) == pytest.approx(geometry.seen_box)


def test_squash_sees_the_whole_image():
    prep = Preprocessing(mode="squash", size=224, resize=None, mean=(0.5,) * 3, std=(0.5,) * 3,
                         interpolation="bilinear")
    assert regions.seen_box((400, 300), prep) == (0.0, 0.0, 400.0, 300.0)


def test_region_outside_the_seen_box_is_refused_and_one_pixel_inside_is_not():
    seen = (54.4, 5.2, 344.3, 294.8)
    corner = regions.region_mask({"box_rel": [0.9, 0.0, 1.0, 1.0]}, (400, 300), ".")   # x 360..400
    with pytest.raises(SpecError, match=r"box_rel \[0.9, 0, 1, 1\] lies entirely outside the part of the "
                                        r"400x300 image the model sees \(x 54.4..344.3, y 5.2..294.8.*"
                                        r"would always pass; move it inside"):
        regions.check_seen(corner, seen, regions.describe({"box_rel": [0.9, 0.0, 1.0, 1.0]}), "avoid")
    with pytest.raises(SpecError, match="would never pass"):
        regions.check_seen(corner, seen, "box", "region")
    edge = regions.region_mask({"box": [343, 0, 400, 300]}, (400, 300), ".")   # pixel 343's centre 343.5 is seen
    regions.check_seen(edge, seen, "box", "avoid")
    beyond = regions.region_mask({"box": [344, 0, 400, 300]}, (400, 300), ".")  # 344.5 is not
    with pytest.raises(SpecError):
        regions.check_seen(beyond, seen, "box", "avoid")


@pytest.mark.slow
def test_avoid_region_the_centre_crop_removes_is_a_setup_error_at_its_line(pytester, monkeypatch):
    photo(pytester.path / "images" / "wide.png", (400, 200))
    spec = {"model": {"arch": "resnet18", "weights": None, "seed": 0, "preprocess": "weights"},
            "cases": [{"id": "wide", "image": "images/wide.png",
                       "focus": {"region": {"box_rel": [0.3, 0.2, 0.7, 0.8]},
                                 "avoid": {"box_rel": [0.9, 0.9, 1, 1]}}},
                      {"id": "fine", "image": "images/wide.png",
                       "focus": {"region": {"box_rel": [0.3, 0.2, 0.7, 0.8]}, "min_energy": 0.0}}]}
    (pytester.path / "crop.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.setenv("MODEL_AUDIT_OFFLINE", "1")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*crop.yaml:*cases[[]0[]].focus.avoid*box_rel [[]0.9, 0.9, 1, 1[]] lies entirely "
                                 "outside the part of the 400x200 image the model sees*"])
    assert "Traceback" not in result.stdout.str()


# -- the terminal and JUnit ------------------------------------------------------------------------

@pytest.fixture
def failing_spec(pytester) -> Path:
    """Two shipped scenes: one passes, one expects its focus where the object is not."""
    found = sorted(json.loads((SHAPES / "boxes.json").read_text()).items())
    (pytester.path / "images").mkdir()
    cases = []
    for i, (name, meta) in enumerate(found[:2]):
        shutil.copy(SHAPES / name, pytester.path / "images" / name)
        box = meta["box"] if i == 0 else [0, 0, 8, 8]
        cases.append({"id": Path(name).stem, "image": f"images/{name}", "expect": {"top1": meta["label"]},
                      "focus": {"region": {"box": box}, "min_energy": 0.3}})
    path = pytester.path / "gate.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "shapes_vgg"}, "cases": cases}, sort_keys=False))
    return path


def test_tb_line_and_short_summary_show_the_failing_metric(pytester, failing_spec):
    result = pytester.runpytest("-p", "no:cacheprovider", "--tb=line", "-rf")
    result.assert_outcomes(passed=3, failed=1)
    out = result.stdout.str()
    crash = [line for line in result.stdout.lines if re.match(r"\S*gate\.yaml:\d+: ", line)]
    assert len(crash) == 1 and re.search(r"gate\.yaml:\d+: \S+ \[focus\]: energy_inside=0\.\d+ >= 0\.30 FAIL$",
                                         crash[0]), out
    assert "focus of " not in out          # --tb=line: no long message
    summary = [line for line in result.stdout.lines if line.startswith("FAILED ")]
    assert len(summary) == 1 and "::focus - energy_inside=" in summary[0], out


def test_tb_line_under_xdist_keeps_the_failing_metric_within_its_50_characters(pytester, failing_spec):
    result = pytester.runpytest("-p", "no:cacheprovider", "--tb=line", "-n", "2")
    result.assert_outcomes(passed=3, failed=1)
    assert any(line.startswith("energy_inside=0.") and "FAIL" in line for line in result.stdout.lines), \
        result.stdout.str()


def test_summary_says_1_case_and_1_forward_pass(pytester, failing_spec):
    spec = yaml.safe_load(failing_spec.read_text())
    spec["cases"] = spec["cases"][:1]
    failing_spec.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["model-audit: 1 case; checks: 2 passed, 0 failed, 0 errors, 0 skipped; "
                                 "1 model load, 1 image in 1 forward pass"])


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_junit_xml_has_flat_properties_and_no_json_records(pytester, failing_spec, tmp_path, workers):
    xml = tmp_path / "junit.xml"
    result = pytester.runpytest("-p", "no:cacheprovider", f"--junitxml={xml}", "--audit-report",
                                str(tmp_path / "rep"), *workers)
    result.assert_outcomes(passed=3, failed=1)
    cases = {f'{tc.get("classname")}.{tc.get("name")}': {p.get("name"): p.get("value") for p in tc.iter("property")}
             for tc in ET.parse(xml).getroot().iter("testcase")}
    assert len(cases) == 4
    for name, props in cases.items():
        assert not any(k.startswith("model_audit") for k in props), (name, props)
        assert all(len(v) < 200 for v in props.values()), props
        assert re.fullmatch(r"[a-z]+", props["top1"]) and 0 < float(props["top1_prob"]) <= 1
    focus = [p for n, p in cases.items() if n.endswith("focus")]
    assert all(0 <= float(p["energy_inside"]) <= 1 for p in focus)
    # the report still gets every record through the reports (the controller rebuilds the cases)
    data = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert len(data["cases"]) == 2 and all(len(c["checks"]) == 2 for c in data["cases"])


# -- model-audit snapshot --------------------------------------------------------------------------

def cli(*args: str, cwd: Path | None = None, timeout: int = 300):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MODEL_AUDIT_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "audit.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_snapshot_of_a_random_model_suggests_no_region_that_cannot_fail(tmp_path):
    """The reported case: random-init resnet50 on a 512x600 image spread its heat over the whole image
    and snapshot wrote the whole image as the box with min_energy 0.9."""
    from audit.spec import load_spec

    photo(tmp_path / "noise.png", (512, 600))
    result = cli("snapshot", str(tmp_path / "noise.png"), "--model", "resnet50", "--weights", "none",
                 "--relative-to", str(tmp_path))
    assert result.returncode == 0, result.stderr
    raw = yaml.safe_load(result.stdout)["cases"][0]
    assert "focus" not in raw
    assert "no focus region suggested" in result.stderr and "nothing discriminative" in result.stderr
    assert "# no focus suggested: " in result.stdout
    (tmp_path / "snap.yaml").write_text(result.stdout)
    assert load_spec(tmp_path / "snap.yaml").case_errors == ()


@pytest.mark.skipif(not (REPO / "audit" / "zoo" / "weights" / "shapes_vgg.pt").is_file(), reason="zoo weights")
def test_snapshot_boxes_are_smaller_than_the_image_beat_an_even_heatmap_and_say_how_they_were_drawn(tmp_path):
    images = sorted(str(p) for p in SHAPES.glob("*-01.png"))
    result = cli("snapshot", *images, "--model", "shapes_vgg")
    assert result.returncode == 0, result.stderr
    cases = yaml.safe_load(result.stdout)["cases"]
    with_focus = [c for c in cases if "focus" in c]
    assert with_focus, result.stdout
    for c in with_focus:
        x0, y0, x1, y1 = c["focus"]["region"]["box"]
        share = (x1 - x0) * (y1 - y0) / (64 * 64)
        assert share <= 0.5 and c["focus"]["min_energy"] > share, c
    comments = [line for line in result.stdout.splitlines() if line.strip().startswith("# box = bounding box")]
    assert len(comments) == len(with_focus)


# -- model-audit compare ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compare_specs(tmp_path_factory, grace_hopper_path) -> Path:
    """A spec whose model block names a squeezenet checkpoint and a labels file, on three drawn scenes
    and a photograph, each with a focus region."""
    import torch
    import torchvision

    from audit.zoo.scenes import make_scene

    folder = tmp_path_factory.mktemp("compare")
    (folder / "images").mkdir()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        torch.save(torchvision.models.squeezenet1_1().state_dict(), folder / "tuned.pt")
    (folder / "labels.json").write_text(json.dumps([f"thing {i}" for i in range(1000)]))
    shutil.copy(grace_hopper_path, folder / "images" / "hopper.jpg")
    cases = [{"id": "hopper", "image": "images/hopper.jpg", "focus": {"region": {"box_rel": [0.2, 0.1, 0.8, 0.7]}}}]
    for seed in range(3):
        scene = make_scene(seed)
        scene.image.save(folder / "images" / f"s{seed}.png")
        cases.append({"id": f"s{seed}", "image": f"images/s{seed}.png", "focus": {"region": {"box": list(scene.box)},
                                                                                  "avoid": {"box": [0, 0, 6, 6]}}})
    spec = {"model": {"arch": "squeezenet1_1", "checkpoint": "tuned.pt", "labels": "labels.json"}, "cases": cases}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


@pytest.mark.slow
def test_compare_uses_the_specs_checkpoint_and_labels_and_fails_on_flips(compare_specs, tmp_path):
    out = tmp_path / "cmp"
    result = cli("compare", str(compare_specs / "spec.yaml"), "--b", "squeezenet1_1:none", "--out", str(out),
                 "--fail-on", "flip")
    data = json.loads((out / "compare.json").read_text())
    assert "checkpoint" in data["a"]["source"] and "tuned.pt" in data["a"]["source"]
    assert "random init" in data["b"]["source"]
    for c in data["cases"]:     # both sides have the spec's arch: the spec's labels name their classes
        assert c["top1_a"]["label"] == f"thing {c['top1_a']['index']}"
        assert c["top1_b"]["label"] == f"thing {c['top1_b']['index']}"
        assert len(c["top_k_a"]) == len(c["top_k_b"]) == 5
    flips = [c["case_id"] for c in data["cases"] if c["flip"]]
    assert flips, "two different random squeezenets should disagree somewhere"
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"--fail-on flip: FAILED ({len(flips)} case" in result.stderr
    assert data["fail_on"] == [{"rule": "flip", "passed": False, "cases": flips}]


@pytest.mark.slow
def test_compare_of_a_model_with_itself_passes_its_fail_on_rules(compare_specs, tmp_path):
    result = cli("compare", str(compare_specs / "spec.yaml"), "--a", "spec", "--b", "spec",
                 "--out", str(tmp_path / "same"), "--fail-on", "flip", "--fail-on", "correlation<0.99")
    assert result.returncode == 0, result.stderr
    assert "--fail-on flip: passed (ok)" in result.stdout + result.stderr
    assert "--fail-on correlation<0.99: passed (ok)" in result.stdout + result.stderr


def test_compare_refuses_a_fail_on_rule_it_does_not_know(compare_specs):
    result = cli("compare", str(compare_specs / "spec.yaml"), "--b", "spec", "--fail-on", "corr<0.5")
    assert result.returncode == 2 and "write flip, flips>N or correlation<X" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.browser
def test_compare_page_has_the_report_cards_and_b_never_wraps_under_a_at_1400px(compare_specs, tmp_path):
    import os

    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("/usr/bin/chromium not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "cmp"
    result = cli("compare", str(compare_specs / "spec.yaml"), "--b", "squeezenet1_1:none", "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "compare.json").read_text())
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto((out / "index.html").as_uri())
        page.evaluate("Array.from(document.images).forEach(i => { i.loading = 'eager'; })")
        page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        boxes = page.evaluate("""Array.from(document.querySelectorAll('article.card')).map(card => {
            const a = card.querySelector('figure.model-a img').getBoundingClientRect();
            const b = card.querySelector('figure.model-b img').getBoundingClientRect();
            return [a.top, a.right, b.top, b.left, card.querySelectorAll('section.topk table').length];
        })""")
        assert len(boxes) == len(data["cases"]) == 4
        for a_top, a_right, b_top, b_left, tables in boxes:
            assert abs(a_top - b_top) < 1 and b_left >= a_right and tables == 2
        flips = sum(c["flip"] for c in data["cases"])
        for name, count in [("all", 4), ("flip", flips), ("same", 4 - flips)]:
            page.click(f"button[data-filter={name}]")
            shown = page.eval_on_selector_all("article.card", "cs => cs.filter(c => !c.hidden).length")
            assert shown == count and page.inner_text(f"button[data-filter={name}]").endswith(f"({count})")
        page.click("button[data-filter=all]")
        page.fill("#search", "hopper")
        assert page.eval_on_selector_all("article.card", "cs => cs.filter(c => !c.hidden).map(c => c.dataset.caseId)") \
            == ["hopper"]
        assert problems == []
        browser.close()
