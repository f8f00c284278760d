"""The extension API end to end: examples/extending adds a check kind, a CAM method and a model from its
conftest.py, and its spec uses all three."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "extending"


@pytest.fixture
def example(pytester: pytest.Pytester) -> Path:
    target = pytester.path / "extending"
    shutil.copytree(EXAMPLE, target)
    return target


def test_the_example_runs_its_own_kind_method_and_model(pytester, example):
    result = pytester.runpytest(str(example), "-p", "no:cacheprovider", "--audit-report", "rep")
    result.assert_outcomes(passed=12)
    listed = pytester.runpytest(str(example), "--collect-only", "-q", "-p", "no:cacheprovider").outlines
    assert sum(line.endswith("::margin") for line in listed) == 4
    import json

    run = json.loads((pytester.path / "rep" / "results.json").read_text())["run"]
    assert [m["cam_method"] for m in run["models"]] == ["eigencam"]
    assert "Blurred(shapes_vgg)" in run["models"][0]["source"]


def test_a_failing_custom_check_reads_like_any_other(pytester, example):
    spec = example / "extending.yaml"
    spec.write_text(spec.read_text().replace("margin: {min: 0.3}", "margin: {min: 0.9999}"))
    result = pytester.runpytest(str(example), "-p", "no:cacheprovider", "-k", "margin")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 1, result.stdout.str()
    result.stdout.fnmatch_lines(["*[[]margin[]] failed*", "*margin * < 1.00*"])


def test_a_spec_naming_an_unregistered_kind_key_is_a_spec_error(pytester, example):
    (example / "conftest.py").write_text((example / "conftest.py").read_text().replace(
        "    registry.add_check_kind(MarginKind())\n", ""))
    result = pytester.runpytest(str(example), "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*defaults.margin: unknown key*"])


def test_user_registrations_do_not_outlive_the_session(pytester, example):
    pytester.runpytest(str(example), "-p", "no:cacheprovider")
    from audit.registry import Registry

    fresh = Registry.default()
    assert "margin" not in fresh.check_kinds and "eigencam" not in fresh.cam_methods


def test_a_registry_restricted_to_some_check_kinds_keeps_every_other_part():
    from audit.errors import UnknownNameError
    from audit.registry import Registry

    full = Registry.default()
    only = full.with_check_kinds("prediction")
    assert list(only.check_kinds) == ["prediction"] and only.cam_methods == full.cam_methods
    assert only.case_sources == full.case_sources and list(full.check_kinds) != ["prediction"]
    assert full.with_check_kinds().check_kinds == {}
    with pytest.raises(UnknownNameError, match="focus"):
        full.with_check_kinds("focsu")
