"""The pytest plugin end to end, through pytester: collection, outcomes, messages, batching, options."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "specs" / "shapes" / "images"

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")


def shipped_scenes() -> list[tuple[str, dict]]:
    return sorted(json.loads((SHAPES / "boxes.json").read_text()).items())


@pytest.fixture
def scenes(pytester: pytest.Pytester) -> list[tuple[str, dict]]:
    """The shipped scene images copied into the test folder, with their labels and boxes."""
    (pytester.path / "images").mkdir()
    found = shipped_scenes()
    for name, _ in found:
        shutil.copy(SHAPES / name, pytester.path / "images" / name)
    return found


def case(name: str, meta: dict, **extra) -> dict:
    entry = {"id": Path(name).stem, "image": f"images/{name}",
             "expect": {"top1": meta["label"]},
             "focus": {"region": {"box": meta["box"]}, "min_energy": 0.3, "pointing_game": True}}
    entry.update(extra)
    return entry


def write_spec(pytester: pytest.Pytester, name: str, cases: list[dict], model: dict | None = None) -> Path:
    spec = {"model": model or {"arch": "shapes_vgg"}, "cases": cases}
    path = pytester.path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def two_specs_of_six_cases(pytester, scenes) -> None:
    write_spec(pytester, "a.yaml", [case(n, m) for n, m in scenes[:6]])
    write_spec(pytester, "b.yaml", [case(n, m) for n, m in scenes[6:12]])


def test_each_case_becomes_a_prediction_and_a_focus_item(pytester, scenes):
    write_spec(pytester, "basic.yaml", [case(n, m) for n, m in scenes[:2]])
    result = pytester.runpytest("--collect-only", "-q")
    ids = [line for line in result.outlines if "::" in line]
    stem = Path(scenes[0][0]).stem
    assert f"basic.yaml::{stem}::prediction" in ids and f"basic.yaml::{stem}::focus" in ids
    assert len(ids) == 4
    assert "model load" not in result.stdout.str()  # collecting never loads a model


def test_shipped_scenes_pass_with_one_model_load_and_one_forward_per_batch(pytester, scenes):
    two_specs_of_six_cases(pytester, scenes)
    result = pytester.runpytest("--audit-batch-size", "16")
    result.assert_outcomes(passed=24)
    result.stdout.fnmatch_lines(["*12 cases*1 model load, 12 images in 1 forward pass"])
    result = pytester.runpytest("--audit-batch-size", "4")
    result.stdout.fnmatch_lines(["*1 model load, 12 images in 3 forward passes*"])


def test_specs_naming_one_model_with_other_explain_settings_never_share_a_forward(pytester, scenes):
    """One model, two ways to explain it (preprocess, cam_layer): a batch holds cases of one way only."""
    write_spec(pytester, "a.yaml", [case(n, m) for n, m in scenes[:3]])
    write_spec(pytester, "b.yaml", [case(n, m) for n, m in scenes[3:6]],
               model={"arch": "shapes_vgg", "cam_layer": "features.12", "preprocess": "weights"})
    result = pytester.runpytest("--audit-report", "reports")
    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines(["*6 cases*1 model load, 6 images in 2 forward passes*"])
    cases = json.loads((pytester.path / "reports" / "results.json").read_text())["cases"]
    assert {c["spec"]: c["cam_layer"] for c in cases} == {"a.yaml": "features.13", "b.yaml": "features.12"}


def test_failed_prediction_reads_like_an_assertion_without_a_traceback(pytester, scenes):
    (name, meta), (_, other) = scenes[0], next(s for s in scenes if s[1]["label"] != scenes[0][1]["label"])
    write_spec(pytester, "wrong.yaml", [case(name, {**meta, "label": other["label"]})])
    result = pytester.runpytest()
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    assert f"top1: expected '{other['label']}'" in out
    assert "top-5:" in out and "wrong.yaml:" in out
    assert "Traceback" not in out and "audit/checks.py" not in out


def test_failed_focus_names_metric_threshold_and_region(pytester, scenes):
    name, meta = scenes[0]
    x0, y0, x1, y1 = meta["box"]
    far = [0, 0, 8, 8] if x0 > 16 or y0 > 16 else [56, 56, 64, 64]
    write_spec(pytester, "focus.yaml", [case(name, {**meta, "box": far})])
    result = pytester.runpytest()
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    assert "energy_inside=" in out and ">= 0.3" in out and f"box {far}".replace(",", ",") in out


def test_one_broken_spec_file_does_not_stop_the_others(pytester, scenes):
    write_spec(pytester, "good.yaml", [case(n, m) for n, m in scenes[:1]])
    (pytester.path / "broken.yaml").write_text("model:\n  arch: shapes_vgg\ncases:\n  - id: a\n    image: [unclosed\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, errors=1)
    out = result.stdout.str()
    assert "broken.yaml:" in out and "Traceback" not in out


def test_unknown_key_is_reported_with_line_and_suggestion(pytester, scenes):
    name, meta = scenes[0]
    bad = case(name, meta)
    bad["focus"]["min_energi"] = bad["focus"].pop("min_energy")
    write_spec(pytester, "typo.yaml", [bad, case(*scenes[1])])
    result = pytester.runpytest()
    out = result.stdout.str()
    assert "min_energi: unknown key; did you mean 'min_energy'?" in out
    assert "typo.yaml:" in out and "Traceback" not in out
    result.assert_outcomes(passed=2, errors=1)


def test_unknown_label_errors_that_case_only_and_suggests_names(pytester, scenes):
    name, meta = scenes[0]
    write_spec(pytester, "labels.yaml", [case(name, {**meta, "label": "cirlce"}), case(*scenes[1])])
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(["*labels.yaml:*expect.top1: unknown label 'cirlce'; did you mean: 'circle'*"])


def test_unknown_layer_lists_close_names(pytester, scenes):
    write_spec(pytester, "layer.yaml", [case(*scenes[0], features=["feature.1"]), case(*scenes[1])])
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(["*layer.yaml:*features[[]0[]]: unknown layer 'feature.1'; did you mean: 'features.1'*"])


def test_region_outside_the_image_is_a_spec_error(pytester, scenes):
    name, meta = scenes[0]
    write_spec(pytester, "region.yaml", [case(name, {**meta, "box": [0, 0, 300, 20]}), case(*scenes[1])])
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(["*region.yaml:*focus.region: *goes outside the 64x64 image*"])


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"),
    (b"not an image at all", "not an image"),
])
def test_bad_image_errors_that_case_only(pytester, scenes, content, reason):
    (pytester.path / "images" / "bad.png").write_bytes(content)
    write_spec(pytester, "img.yaml", [case("bad.png", scenes[0][1]), case(*scenes[1])])
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, errors=2)
    out = result.stdout.str()
    assert "bad.png" in out and reason in out and "Traceback" not in out


def test_unrelated_yaml_is_never_collected(pytester):
    (pytester.path / "docker-compose.yaml").write_text("services:\n  web:\n    image: nginx\n")
    (pytester.path / "ci.yml").write_text("jobs:\n  test:\n    steps: [{run: pytest}]\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_python_tags_are_refused_and_never_executed(pytester, tmp_path):
    marker = tmp_path / "pwned"
    (pytester.path / "evil.yaml").write_text(
        f"model: !!python/object/apply:os.system ['touch {marker}']\ncases: []\n")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    assert "not allowed" in result.stdout.str()
    assert not marker.exists()


def test_weights_unavailable_skips_with_one_reason_and_strict_makes_it_an_error(pytester, scenes, monkeypatch,
                                                                              tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MODEL_AUDIT_OFFLINE", "1")
    write_spec(pytester, "vgg.yaml", [case(*scenes[0])], model={"arch": "vgg16", "weights": "IMAGENET1K_V1"})
    write_spec(pytester, "shapes.yaml", [case(*scenes[1])])
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines(["*model-audit: 2 checks did not run: weights vgg16 IMAGENET1K_V1 *not available*"])
    strict = pytester.runpytest("--audit-strict")
    strict.assert_outcomes(passed=2, errors=4)   # and under --audit-strict every case needs its baseline


def test_k_and_m_select_items_and_last_failed_reruns_only_failures(pytester, scenes):
    (n0, m0), (n1, m1) = scenes[0], scenes[1]
    wrong = {**m1, "label": m0["label"] if m0["label"] != m1["label"] else scenes[2][1]["label"]}
    write_spec(pytester, "sel.yaml", [case(n0, m0, marks=["smoke"]), case(n1, wrong)])
    pytester.makeini("[pytest]\nmarkers =\n    smoke: quick cases\n")
    pytester.runpytest("-k", "focus").assert_outcomes(passed=2)
    pytester.runpytest("-m", "smoke").assert_outcomes(passed=2)
    pytester.runpytest().assert_outcomes(passed=3, failed=1)
    pytester.runpytest("--lf").assert_outcomes(failed=1)


def test_junitxml_names_each_check(pytester, scenes):
    write_spec(pytester, "junit.yaml", [case(*scenes[0])])
    pytester.runpytest("--junitxml=out.xml").assert_outcomes(passed=2)
    xml = (pytester.path / "out.xml").read_text()
    assert 'name="prediction"' in xml or "::prediction" in xml or "prediction" in xml


def test_xdist_gives_the_same_outcomes_as_serial(pytester, scenes):
    (_, m0), (n1, m1) = scenes[0], scenes[1]
    wrong = {**m1, "label": m0["label"] if m0["label"] != m1["label"] else scenes[2][1]["label"]}
    write_spec(pytester, "x.yaml", [case(n, m) for n, m in scenes[2:8]] + [case(n1, wrong)])
    serial = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    parallel = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    assert serial.parseoutcomes() == parallel.parseoutcomes() == {"passed": 13, "failed": 1}


def test_xdist_results_equal_serial_results_under_the_documented_tolerance(pytester, scenes):
    """Serial batches of 16 and ``-n 2`` (each image alone) sum floats in another order: the results.json
    and pictures of the two runs are equal under ``audit.rundiff``'s tolerance, and not byte for byte."""
    from audit import rundiff

    write_spec(pytester, "x.yaml", [case(n, m, features=["features.1"]) for n, m in scenes[:12]])
    serial = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--audit-report", "serial",
                                           "--audit-batch-size", "16")
    parallel = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--audit-report", "parallel")
    assert serial.parseoutcomes() == parallel.parseoutcomes() == {"passed": 24}
    parallel.stdout.fnmatch_lines(["*12 images in 12 forward passes*"])   # batches of one image
    docs = [json.loads((pytester.path / run / "results.json").read_text()) for run in ("serial", "parallel")]
    assert rundiff.differences(*docs) == []
    assert rundiff.picture_differences(pytester.path / "serial", docs[0], pytester.path / "parallel", docs[1]) == []
    # the comparison is not vacuous: every case and its pictures were compared, and a real change is seen
    assert len(docs[1]["cases"]) == 12
    changed = json.loads(json.dumps(docs[1]))
    changed["cases"][0]["top_k"][0]["prob"] -= 1e-3
    assert len(rundiff.differences(docs[0], changed)) == 1
    del changed["cases"][0]["assets"]["heatmap"]
    assert len(rundiff.picture_differences(pytester.path / "serial", docs[0], pytester.path / "parallel",
                                           changed)) == 1


def test_report_folder_that_cannot_be_written_fails_before_any_model_runs(pytester, scenes):
    write_spec(pytester, "r.yaml", [case(*scenes[0])])
    (pytester.path / "afile").write_text("a file, not a folder")
    result = pytester.runpytest("--audit-report", "afile/reports")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "not writable" in result.stderr.str()
    assert "model load" not in result.stdout.str()


def test_report_is_written_with_results_json(pytester, scenes):
    write_spec(pytester, "rep.yaml", [case(n, m, features=["features.1"]) for n, m in scenes[:3]])
    result = pytester.runpytest("--audit-report", "reports")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["*model-audit report: reports*index.html*"])
    data = json.loads((pytester.path / "reports" / "results.json").read_text())
    assert data["run"]["counts"] == {"passed": 6, "failed": 0, "skipped": 0, "error": 0}
    first = data["cases"][0]
    assert first["outcome"] == "passed" and {c["kind"] for c in first["checks"]} == {"prediction", "focus"}
    assert first["top_k"][0]["expected"] is True
    for path in (first["assets"]["overlay"], first["assets"]["grids"]["features.1"]):
        assert (pytester.path / "reports" / path).is_file()


def test_report_under_xdist_is_written_by_the_controller_from_what_the_workers_drew(pytester, scenes):
    write_spec(pytester, "rep.yaml", [case(n, m, features=["features.1"]) for n, m in scenes[:6]])
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--audit-report", "reports")
    assert result.parseoutcomes() == {"passed": 12}
    result.stdout.fnmatch_lines(["*model-audit report: reports*index.html*"])
    out = pytester.path / "reports"
    data = json.loads((out / "results.json").read_text())
    assert data["run"]["counts"] == {"passed": 12, "failed": 0, "skipped": 0, "error": 0}
    assert len(data["cases"]) == 6
    for entry in data["cases"]:
        assets = entry["assets"]
        for path in (assets["image"], assets["heatmap"], assets["overlay"], assets["colorbar"],
                     assets["grids"]["features.1"]):
            assert (out / path).is_file(), path
    html = (out / "index.html").read_text()
    assert html.count('<article class="card passed"') == 6
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".tmp-*"))


def test_xdist_loadfile_batches_each_spec_and_default_scheduling_never_looks_ahead(pytester, scenes):
    two_specs_of_six_cases(pytester, scenes)
    grouped = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile")
    assert grouped.parseoutcomes() == {"passed": 24}
    grouped.stdout.fnmatch_lines(["*12 cases*12 images in 2 forward passes*"])
    default = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    assert default.parseoutcomes() == {"passed": 24}
    # the checks of a case share a worker, so each image is observed once; a worker cannot know which
    # cases it gets next, so it never batches a case that another worker will run
    default.stdout.fnmatch_lines(["*12 cases*12 images in 12 forward passes*"])


def test_xdist_loadscope_runs_each_image_once(pytester, scenes):
    two_specs_of_six_cases(pytester, scenes)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--dist", "loadscope")
    assert result.parseoutcomes() == {"passed": 24}
    result.stdout.fnmatch_lines(["*12 cases*12 images in 12 forward passes*"])


def test_xdist_case_scheduling_also_runs_plain_tests(pytester, scenes):
    write_spec(pytester, "a.yaml", [case(n, m) for n, m in scenes[:4]])
    pytester.makepyfile(test_plain="""
        import pytest

        @pytest.mark.parametrize("i", range(8))
        def test_plain(i):
            assert i < 7
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    assert result.parseoutcomes() == {"passed": 15, "failed": 1}
    result.stdout.fnmatch_lines(["*4 cases*4 images in 4 forward passes*"])
