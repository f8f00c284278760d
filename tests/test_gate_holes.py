"""The gate has no holes (issue 16): missing and unused baselines, re-recording, empty runs, marks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCENES = REPO / "specs" / "shapes" / "images"


@pytest.fixture
def spec(pytester: pytest.Pytester) -> Path:
    (pytester.path / "images").mkdir()
    boxes = json.loads((SCENES / "boxes.json").read_text())
    cases = []
    for name, meta in sorted(boxes.items())[:3]:
        shutil.copy(SCENES / name, pytester.path / "images" / name)
        cases.append({"id": Path(name).stem, "image": f"images/{name}", "expect": {"top1": meta["label"]}})
    path = pytester.path / "gate.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "shapes_vgg"}, "cases": cases}, sort_keys=False))
    return path


def cases_of(spec: Path) -> list[dict]:
    return yaml.safe_load(spec.read_text())["cases"]


def write_cases(spec: Path, cases: list[dict], **top) -> None:
    data = yaml.safe_load(spec.read_text())
    data.update(top, cases=cases)
    spec.write_text(yaml.safe_dump(data, sort_keys=False))


def test_under_strict_a_spec_without_any_baseline_errors_instead_of_passing(pytester, spec):
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=3)
    strict = pytester.runpytest("-p", "no:cacheprovider", "--audit-strict")
    strict.assert_outcomes(passed=3, errors=3)
    strict.stdout.fnmatch_lines(["*no baseline for *record it with --audit-update-baselines*"])


def test_declared_tolerances_without_recordings_are_skips_never_passes(pytester, spec):
    write_cases(spec, cases_of(spec), baseline={"min_hot_iou": 0.3})
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=3, skipped=3)


def test_rerecording_leaves_unchanged_files_byte_identical_and_says_so(pytester, spec):
    first = pytester.runpytest("-p", "no:cacheprovider", "--audit-update-baselines")
    first.stdout.fnmatch_lines(["model-audit baselines: 3 recorded, 0 unchanged, 0 unused"])
    folder = pytester.path / "baselines" / "gate"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    second = pytester.runpytest("-p", "no:cacheprovider", "--audit-update-baselines")
    second.stdout.fnmatch_lines(["model-audit baselines: 0 recorded, 3 unchanged, 0 unused"])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_baselines_of_a_deleted_case_are_listed_and_removed_on_request(pytester, spec):
    pytester.runpytest("-p", "no:cacheprovider", "--audit-update-baselines")
    write_cases(spec, cases_of(spec)[:2])
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["model-audit baselines: 1 unused", "  unused: *.json", "  unused: *.npy",
                                 "*--audit-remove-unused-baselines deletes them*"])
    removed = pytester.runpytest("-p", "no:cacheprovider", "--audit-remove-unused-baselines")
    removed.stdout.fnmatch_lines(["model-audit baselines: 1 removed"])
    assert len(list((pytester.path / "baselines" / "gate").glob("*.json"))) == 2


def test_the_end_of_run_summary_reads_the_specs_collected_not_the_files_again(pytester, spec):
    """A 10,000-case dataset spec must not be parsed a second time for the summary lines (it doubled the
    run's peak memory for them): the unused baselines are found from the spec as collected, even when
    the file changed after collection."""
    pytester.runpytest("-p", "no:cacheprovider", "--audit-update-baselines")
    write_cases(spec, cases_of(spec)[:2])
    pytester.makeconftest("""
        from pathlib import Path

        def pytest_collection_finish(session):
            Path("gate.yaml").write_text("model: [this is not a spec")
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["model-audit baselines: 1 unused", "  unused: *.json"])


@pytest.mark.parametrize("args", [["nothere"], ["-k", "nomatch"]])
def test_a_run_that_collects_no_case_keeps_the_last_good_report(pytester, spec, args):
    pytester.runpytest("-p", "no:cacheprovider", "--audit-report", "rep").assert_outcomes(passed=3)
    page = (pytester.path / "rep" / "index.html").read_bytes()
    pictures = sorted(p.name for p in (pytester.path / "rep" / "assets").rglob("*") if p.is_file())
    result = pytester.runpytest("-p", "no:cacheprovider", "--audit-report", "rep", *args)
    assert (pytester.path / "rep" / "index.html").read_bytes() == page
    assert sorted(p.name for p in (pytester.path / "rep" / "assets").rglob("*") if p.is_file()) == pictures
    result.stdout.fnmatch_lines(["*no spec case ran; the report in rep was left as it was*"])


def test_marks_with_arguments_work_under_strict_markers_and_xfail_is_reported_as_such(pytester, spec):
    cases = cases_of(spec)
    cases[0]["marks"] = [{"xfail": {"reason": "known confusion", "strict": False}}, "nightly"]
    cases[0]["expect"] = {"top1": "ring" if cases[0]["expect"]["top1"] != "ring" else "circle"}
    cases[1]["marks"] = [{"skip": "not on this machine"}]
    write_cases(spec, cases)
    result = pytester.runpytest("-p", "no:cacheprovider", "--strict-markers", "-W", "error::pytest.PytestUnknownMarkWarning",
                                "--audit-report", "rep")
    result.assert_outcomes(passed=1, xfailed=1, skipped=1)
    result.stdout.fnmatch_lines(["*2 images in 1 forward pass*"])      # the skipped case never ran
    data = json.loads((pytester.path / "rep" / "results.json").read_text())
    outcomes = {c["case_id"]: [ch["outcome"] for ch in c["checks"]] for c in data["cases"]}
    assert outcomes[cases[0]["id"]] == ["xfailed"] and outcomes[cases[1]["id"]] == ["skipped"]
    assert pytester.runpytest("-p", "no:cacheprovider", "-m", "nightly").ret == 0
