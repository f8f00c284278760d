"""Golden sets end to end: dataset: specs through pytest, set-level gates (serial, xdist, shards + merge)."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from audit.merge import merge, regate_from_specs, verdict
from audit.regions import region_mask
from audit.spec import load_spec
from audit.zoo.make_dataset import write_dataset
from audit.zoo.scenes import CLASSES, SEED_RANGES, make_scene

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "specs" / "shapes-dataset" / "golden.yaml"
SEED = SEED_RANGES["tests"][0] + 750_000   # other seeds than the shipped set and the other tests

SPEC = """\
model: {{arch: {arch}}}
dataset:
{dataset}
defaults:
  expect: {{top1_is_label: true}}
  focus: {{region: annotation, pointing_game: true, min_energy: 0.4}}
gates:
  min_top1_accuracy: 0.9
  min_pointing_game_rate: 0.85
"""

DATASETS = {
    "coco": "  coco: set/annotations/instances.json\n  images: set/images\n  annotation: bbox",
    "coco_segmentation": "  coco: set/annotations/instances.json\n  images: set/images",
    "voc": "  voc: set/Annotations",
    "folder": "  folder: set",
    "csv": "  manifest: set/cases.csv",
}


def golden(folder: Path, fmt: str = "coco", n: int = 12, arch: str = "shapes_vgg", marker: bool = False,
           extra: str = "", defaults: bool = True) -> Path:
    write_dataset(folder / "set", n, {"coco_segmentation": "coco"}.get(fmt, fmt), first_seed=SEED, marker=marker)
    text = SPEC.format(arch=arch, dataset=DATASETS[fmt]) + extra
    if fmt == "folder" and defaults:
        text = text.replace("  focus: {region: annotation, pointing_game: true, min_energy: 0.4}\n", "")
        text = text.replace("  min_pointing_game_rate: 0.85\n", "")
    (folder / "golden.yaml").write_text(text)
    return folder / "golden.yaml"


def outcomes_by_item(pytester: pytest.Pytester, *args: str) -> dict[str, str]:
    pytester.runpytest(*args, "--junitxml=out.xml", "-p", "no:cacheprovider")
    found = {}
    for case in ET.parse(pytester.path / "out.xml").getroot().iter("testcase"):
        children = {child.tag for child in case}
        found[f"{case.get('classname')}::{case.get('name')}"] = (
            "failed" if "failure" in children else "error" if "error" in children
            else "skipped" if "skipped" in children else "passed")
    return found


# --------------------------------------------------------------------------------- spec loading

@pytest.mark.parametrize("fmt", ["coco", "coco_segmentation", "voc", "folder", "csv"])
def test_each_format_gives_one_case_per_image_with_the_annotated_region(tmp_path, fmt):
    spec = load_spec(golden(tmp_path, fmt))
    truth = json.loads((tmp_path / "set" / "truth.json").read_text())["images"]
    assert len(spec.cases) == len(truth) == 12
    assert not spec.case_errors
    by_file = {Path(rel).name: entry for rel, entry in truth.items()}
    for case in spec.cases:
        entry = by_file[case.image.name]
        assert case.label == entry["label"] and case.labels == (entry["label"],)
        prediction = case.checks["prediction"]
        assert prediction.top1_is_label
        if fmt == "folder":
            assert case.annotations == {} and case.checks["focus"] is None
            continue
        scene = make_scene(entry["seed"], label=CLASSES.index(entry["label"]))
        expected = scene.mask if fmt == "coco_segmentation" else region_mask({"box": entry["box"]}, (64, 64), ".")
        focus = case.checks["focus"]
        assert np.array_equal(focus.region.mask((64, 64)), expected)
        assert focus.pointing_game and focus.min_energy == 0.4


def test_a_datasets_cases_share_their_key_lines_and_point_them_at_the_defaults(tmp_path):
    """10,000 cases of one dataset have equal key lines: one mapping for all of them, still right."""
    spec = load_spec(golden(tmp_path, "coco"))
    first, *others = spec.cases
    assert all(case.lines is first.lines and case.mark_args is first.mark_args for case in others)
    defaults_line = spec.path.read_text().splitlines().index(
        "  focus: {region: annotation, pointing_game: true, min_energy: 0.4}") + 1
    assert first.line_of("focus.min_energy") == defaults_line and others[-1].line_of("focus") == defaults_line


def test_limit_is_a_deterministic_sample(tmp_path):
    path = golden(tmp_path, "coco", n=30, extra="")
    text = path.read_text().replace("  annotation: bbox", "  annotation: bbox\n  limit: 7")
    path.write_text(text)
    first, second = load_spec(path), load_spec(path)
    assert len(first.cases) == 7 and [c.id for c in first.cases] == [c.id for c in second.cases]


def test_labels_map_maps_dataset_classes_to_model_labels(tmp_path):
    path = golden(tmp_path, "csv")
    path.write_text(path.read_text().replace("  manifest: set/cases.csv",
                                             "  manifest: set/cases.csv\n  labels_map: {circle: [ring, circle]}"))
    with pytest.warns(UserWarning, match=r"dataset: 10 of 12 images left out: line 3: class 'square' is not "
                                         r"in labels_map"):
        spec = load_spec(path)
    assert [(c.label, c.labels) for c in spec.cases] == [("circle", ("ring", "circle"))] * 2


@pytest.mark.parametrize("change, message", [
    (("set/annotations/instances.json", "set/annotations/missing.json"),
     r"golden.yaml:3: dataset.coco: set/annotations/missing.json not found"),
    (("  annotation: bbox", "  annotation: bbox\n  labels_map: {circel: circle}"),
     r"golden.yaml:6: dataset.labels_map: labels_map: 'circel' is not a class of instances.json; "
     r"did you mean: 'circle'"),
    (("  images: set/images\n", ""), r"golden.yaml:\d+: dataset.images: a COCO set needs images"),
])
def test_dataset_block_problems_name_the_spec_line(pytester, change, message):
    path = golden(pytester.path, "coco")
    path.write_text(path.read_text().replace(*change))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stdout.re_match_lines([f".*{message}.*"])
    assert result.ret != 0 and "Traceback" not in result.stdout.str()


def test_a_bad_annotation_errors_its_case_only_naming_the_annotation_file_and_the_record(pytester):
    path = golden(pytester.path, "coco")
    ann = pytester.path / "set" / "annotations" / "instances.json"
    doc = json.loads(ann.read_text())
    doc["annotations"][3]["bbox"][2] = -4
    ann.write_text(json.dumps(doc))
    bad_id = Path(next(i["file_name"] for i in doc["images"] if i["id"] == doc["annotations"][3]["image_id"])).stem
    result = pytester.runpytest(str(path), "-p", "no:cacheprovider", "-rs")
    result.stdout.fnmatch_lines([f"*ERROR at setup of {bad_id}::prediction*",
                                 "*set/annotations/instances.json: annotation 4: bbox has negative width*"])
    assert "Traceback" not in result.stdout.str()
    outcomes = outcomes_by_item(pytester, str(path))
    assert outcomes.pop(f"golden.yaml.{bad_id}::prediction") == "error"   # one item: the case cannot run
    assert not any(bad_id in item for item in outcomes)
    gates = outcomes.pop("golden.yaml::gates")
    assert len(outcomes) == 2 * 11 and set(outcomes.values()) == {"passed"}, outcomes
    # the gates ran over all 12 cases, the errored one counted wrong and named
    result = pytester.runpytest(str(path), "-p", "no:cacheprovider", "-o", "addopts=", "-k", "gates or " + bad_id)
    result.stdout.fnmatch_lines(["*gates: *over 1 cases, 1 errored*", f"*errored cases: {bad_id}*"])
    assert gates in ("passed", "failed")


def test_region_annotation_and_top1_is_label_need_a_dataset_case(tmp_path):
    (tmp_path / "a.png").write_bytes((REPO / "specs" / "shapes" / "images" / "circle-01.png").read_bytes())
    (tmp_path / "hand.yaml").write_text("model: {arch: shapes_vgg}\ncases:\n  - id: a\n    image: a.png\n"
                                        "    expect: {top1_is_label: true}\n    focus: {region: annotation}\n")
    (error,) = load_spec(tmp_path / "hand.yaml").case_errors
    assert "top1_is_label needs a case with a label" in str(error)
    assert "region: annotation needs a case read from a dataset" in str(error)


def test_region_annotation_on_a_folder_set_is_a_case_error(tmp_path):
    path = golden(tmp_path, "folder", defaults=False)
    errors = load_spec(path).case_errors
    assert len(errors) == 12
    assert "this image has no annotated region of its label 'circle' (a folder set has labels only" in str(errors[0])


# --------------------------------------------------------------------------------------- pytest runs

def test_a_dataset_spec_runs_its_cases_and_gates(pytester):
    golden(pytester.path, "voc")
    outcomes = outcomes_by_item(pytester)
    assert len([k for k in outcomes if k.endswith("prediction")]) == 12
    assert len([k for k in outcomes if k.endswith("focus")]) == 12
    assert outcomes["golden.yaml::gates"] == "passed"
    assert set(outcomes.values()) == {"passed"}, outcomes


def test_the_report_overview_shows_the_top1_confusion_and_histograms_of_the_set(pytester):
    """The page opens on the set: expected class against predicted top-1 (counted here from the
    generator's truth and results.json, independently of the page code) and the two histograms."""
    import re

    golden(pytester.path, "coco", n=24, arch="shapes_vgg_shortcut")   # no marker: the twin confuses classes
    pytester.runpytest("-p", "no:cacheprovider", "--audit-report", "rep")
    truth = {Path(rel).stem: entry["label"]
             for rel, entry in json.loads((pytester.path / "set" / "truth.json").read_text())["images"].items()}
    results = json.loads((pytester.path / "rep" / "results.json").read_text())
    expected: dict[tuple[str, str], int] = {}
    for case in results["cases"]:
        if case["case_id"] in truth:
            key = (truth[case["case_id"]], case["top_k"][0]["label"] if case["top_k"] else "error")
            expected[key] = expected.get(key, 0) + 1
    assert any(e != p for e, p in expected), "the shortcut twin should confuse some classes"
    page = (pytester.path / "rep" / "index.html").read_text()
    table = page[page.index('<table class="confusion">'):]
    table = table[:table.index("</table>")]
    columns = re.findall(r"<th>([^<]*)</th>", table.split("</thead>")[0])[1:-1]
    shown = {}
    for label, cells in re.findall(r"<tr><th>([^<]*)</th>(.*?)</tr>", table.split("<tbody>")[1], re.S):
        counts = re.findall(r'<td class="num[^"]*">([^<]*)</td>', cells)[:-1]
        shown.update({(label, col): int(n) for col, n in zip(columns, counts) if n})
    assert shown == expected
    assert "most frequent confusions:" in page
    assert "(no expected class)" not in page   # the gates' card is no class's case
    for name in ("top-1 probability", "energy inside the region"):
        block = page[page.index(f"<h2>{name}</h2>"):]
        block = block[:block.index("</table>")]
        assert sum(int(n) for n in re.findall(r'<td class="num">(\d+)</td>', block)) == 24


def test_gates_skip_when_no_case_is_selected_and_fail_with_a_class_table(pytester):
    golden(pytester.path, "coco", arch="shapes_vgg_shortcut")
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "gates", "-rs")
    result.stdout.fnmatch_lines(["*no case of this spec was selected*"])
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "gates or circle")
    result.stdout.fnmatch_lines(["*golden.yaml: [[]gates[]] failed", "gates: 2 of 2 gates failed over 2 cases",
                                 "*pointing_game_rate=0.00 >= 0.85 FAIL: 0 of 2 hottest points*",
                                 "*class*n*recall*pointing*energy", "*circle*2*"])


@pytest.mark.slow
def test_shipped_golden_set_catches_the_shortcut_twin_at_the_set_level(pytester):
    assert set(outcomes_by_item(pytester, str(SHIPPED)).values()) == {"passed"}
    twin = pytester.path / "twin"
    twin.mkdir()
    for child in SHIPPED.parent.iterdir():
        if child.name != "golden.yaml":
            (twin / child.name).symlink_to(child)
    (twin / "golden.yaml").write_text(SHIPPED.read_text().replace("arch: shapes_vgg}", "arch: shapes_vgg_shortcut}"))
    result = pytester.runpytest(str(twin / "golden.yaml"), "-p", "no:cacheprovider")
    text = result.stdout.str()
    assert "top1_accuracy=1.00 >= 0.95 ok" in text and "min_class_recall=1.00 >= 0.90 ok" in text
    assert "pointing_game_rate=0.06 >= 0.85 FAIL" in text and "median_energy=0.02 >= 0.50 FAIL" in text
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 120 and outcomes["failed"] >= 1 + 100   # predictions pass, focus mostly fails


@pytest.mark.slow
def test_gates_under_xdist_equal_a_serial_run(pytester):
    golden(pytester.path, "coco", n=24, arch="shapes_vgg_shortcut", marker=True)
    serial = pytester.runpytest("-p", "no:cacheprovider")
    parallel = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    def gate_lines(text: str) -> list[str]:
        lines = text.splitlines()
        start = lines.index("golden.yaml: [gates] failed")
        block = [lines[start + 1]]
        for line in lines[start + 2:]:
            if not line.startswith("  "):
                break
            block.append(line)
        return block
    assert gate_lines(parallel.stdout.str()) == gate_lines(serial.stdout.str())
    assert any("pointing_game_rate=" in line for line in gate_lines(serial.stdout.str()))
    assert parallel.parseoutcomes() == {k: v for k, v in serial.parseoutcomes().items() if k != "warnings"}


@pytest.mark.slow
def test_three_shards_merged_equal_one_run(pytester):
    golden(pytester.path, "coco", n=24, arch="shapes_vgg_shortcut", marker=True)
    pytester.runpytest("-p", "no:cacheprovider", "--audit-report", "whole")
    for k in (1, 2, 3):
        result = pytester.runpytest("-p", "no:cacheprovider", "--audit-shard", f"{k}/3", "--audit-report", f"s{k}")
        result.stdout.fnmatch_lines(["*deselected*"])
    index, run = merge([pytester.path / f"s{k}" for k in (1, 2, 3)], pytester.path / "merged",
                       regate=regate_from_specs)
    whole = json.loads((pytester.path / "whole" / "results.json").read_text())
    merged = json.loads((pytester.path / "merged" / "results.json").read_text())

    def by_item(doc):
        return {c["nodeid"]: c["outcome"] for case in doc["cases"] for c in case["checks"]}

    assert by_item(merged) == by_item(whole) and len(by_item(whole)) == 24 * 2 + 1
    assert merged["run"]["counts"] == whole["run"]["counts"]
    gates = [c for case in merged["cases"] for c in case["checks"] if c["kind"] == "gates"]
    whole_gates = [c for case in whole["cases"] for c in case["checks"] if c["kind"] == "gates"]
    assert [g["message"] for g in gates] == [g["message"] for g in whole_gates]
    assert verdict(run) == 1 and index.is_file()


@pytest.mark.slow
def test_set_level_baseline_is_recorded_and_a_drop_fails(pytester):
    path = golden(pytester.path, "coco", extra="  baseline: {max_accuracy_drop: 0.05}\n")
    pytester.runpytest("-p", "no:cacheprovider", "--audit-update-baselines").assert_outcomes(passed=37)
    recorded = pytester.path / "baselines" / "golden" / "@gates.json"
    assert json.loads(recorded.read_text())["metrics"]["accuracy"] == 1.0
    path.write_text(path.read_text().replace("arch: shapes_vgg}", "arch: shapes_vgg_shortcut}"))
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "gates or prediction")
    result.stdout.fnmatch_lines(["*accuracy_drop=0.* <= 0.05 FAIL: top-1 accuracy 1.000 at the baseline*"])


@pytest.mark.slow
def test_gates_under_xdist_with_one_check_per_case(pytester):
    """A case whose only item is its prediction has the scope ``spec.yaml::case``, one ``::`` like the
    gates item itself; and a worker runs its last case only once it gets more work or the shutdown."""
    golden(pytester.path, "folder")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "-rA")
    result.stdout.fnmatch_lines(["PASSED golden.yaml::gates"])
    result.assert_outcomes(passed=13)
