"""Every kind of bad input the design names for specs, models and the report folder, end to end.

Each test runs the bad spec (or the bad case) next to ``good.yaml`` (two shipped scenes) in one pytest
run with a report, and pins: one clear message with file:line where there is a line, no traceback, the
good cases still run and pass, and the report stays valid and lists every case.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision

from .conftest import (SHAPES, Report, assert_good_cases_passed, assert_no_traceback, check_report, good_case,
                       good_cases, item_outcomes, outcomes_of, run_with_report, write_spec)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")

GOOD_IDS = ["circle-01", "square-01"]


def good_spec(pytester: pytest.Pytester, scenes: dict) -> None:
    write_spec(pytester, "good.yaml", good_cases(scenes))


def error_lines(result: pytest.RunResult, needle: str) -> list[str]:
    """The lines of the terminal output that carry ``needle`` (the error section, not the summary)."""
    return [line for line in result.stdout.lines if needle in line and not line.startswith("ERROR ")]


def assert_rest_ok(result: pytest.RunResult, pytester: pytest.Pytester, scenes: dict,
                   expected_ids: list[str]) -> Report:
    assert_good_cases_passed(result, "good.yaml", scenes)
    assert_no_traceback(result)
    return check_report(pytester, GOOD_IDS + expected_ids)


# --------------------------------------------------------------------------------------- YAML level

def test_yaml_syntax_error_is_one_erroring_spec_item_with_file_and_line(pytester, scenes):
    good_spec(pytester, scenes)
    (pytester.path / "broken.yaml").write_text(
        "model:\n  arch: shapes_vgg\ncases:\n  - id: a\n    image: [unclosed\n  - id: b\n")
    result = run_with_report(pytester)
    assert outcomes_of(result, "broken.yaml") == {"broken.yaml::spec": "error"}
    lines = error_lines(result, "broken.yaml:")
    assert len(lines) == 1 and any(f"broken.yaml:{n}:" in lines[0] for n in (5, 6)), lines
    report = assert_rest_ok(result, pytester, scenes, ["(invalid spec)"])
    broken = report.case("(invalid spec)", spec="broken.yaml")
    assert broken["outcome"] == "error" and "broken.yaml:" in broken["error"]


@pytest.mark.parametrize("text, message", [
    ("modle:\n  arch: shapes_vgg\ncases:\n  - {id: a, image: images/circle-01.png}\n",
     "modle: unknown key; did you mean 'model'?"),
    ("model:\n  arch: shapes_vgg\n  wieghts: null\ncases:\n  - {id: a, image: images/circle-01.png}\n",
     "wieghts: unknown key; did you mean 'weights'?"),
], ids=["spec-level", "model-level"])
def test_unknown_key_in_the_spec_or_model_suggests_the_right_one(pytester, scenes, text, message):
    good_spec(pytester, scenes)
    (pytester.path / "typo.yaml").write_text(text)
    result = run_with_report(pytester)
    assert set(outcomes_of(result, "typo.yaml").values()) == {"error"}
    lines = error_lines(result, message)
    assert lines and all("typo.yaml:" in line for line in lines), result.stdout.str()[-2000:]
    assert_rest_ok(result, pytester, scenes, [])


@pytest.mark.parametrize("extra, message", [
    ({"expekt": {"top1": "circle"}}, "expekt: unknown key; did you mean 'expect'?"),
    ({"top_k": "five"}, "top_k: expected an integer, got text ('five')"),
    ({"expect": {"top1": "cirlce"}}, "expect.top1: unknown label 'cirlce'; did you mean: 'circle'"),
    ({"features": ["feature.1"]}, "features[0]: unknown layer 'feature.1'; did you mean: 'features.1'"),
    ({"focus": {"region": {"box": [0, 0, 300, 20]}}}, "focus.region: "),
], ids=["unknown-key", "wrong-type", "unknown-label", "unknown-layer", "region-outside"])
def test_bad_case_errors_alone_with_file_line_key_and_suggestion(pytester, scenes, extra, message):
    good_spec(pytester, scenes)
    name, meta = next(iter(scenes.items()))
    bad = good_case(name, meta, id="bad")
    bad.update(extra)
    write_spec(pytester, "bad.yaml", [bad, good_case(name, meta, id="fine")])
    result = run_with_report(pytester)
    bad_items = outcomes_of(result, "bad.yaml::bad::")
    assert bad_items and set(bad_items.values()) == {"error"}, bad_items
    assert set(outcomes_of(result, "bad.yaml::fine::").values()) == {"passed"}
    lines = error_lines(result, message)
    assert lines and all("bad.yaml:" in line for line in lines), result.stdout.str()[-2000:]
    if "region" in message:
        assert "outside the 64x64 image" in lines[0]
    report = assert_rest_ok(result, pytester, scenes, ["bad", "fine"])
    assert message in report.case("bad")["error"]


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:os.system ['touch {marker}']",
    "!!python/object:os.system {{}}",
    "!!python/name:os.system ''",
    "!!python/module:os ''",
])
def test_python_tags_are_refused_and_never_executed(pytester, scenes, tmp_path, tag):
    good_spec(pytester, scenes)
    marker = tmp_path / "pwned"
    (pytester.path / "evil.yaml").write_text(
        "model:\n  arch: shapes_vgg\ncases:\n  - id: a\n    image: images/circle-01.png\n"
        f"    top_k: {tag.format(marker=marker)}\n")
    result = run_with_report(pytester)
    assert outcomes_of(result, "evil.yaml") == {"evil.yaml::spec": "error"}
    lines = error_lines(result, "is not allowed")
    assert len(lines) == 1 and "evil.yaml:6:" in lines[0] and "!!python/" in lines[0], lines
    assert not marker.exists()
    assert_rest_ok(result, pytester, scenes, ["(invalid spec)"])


def test_billion_laughs_is_refused_fast(pytester, scenes):
    good_spec(pytester, scenes)
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    (pytester.path / "bomb.yaml").write_text(
        "model: {arch: shapes_vgg}\n" + "\n".join(lines)
        + "\ncases:\n  - {id: a, image: images/circle-01.png, marks: *l9}\n")
    started = time.perf_counter()
    result = run_with_report(pytester)
    assert time.perf_counter() - started < 15  # 9**10 strings expanded would never finish
    assert outcomes_of(result, "bomb.yaml") == {"bomb.yaml::spec": "error"}
    assert error_lines(result, "expands to more than"), result.stdout.str()[-2000:]
    assert_rest_ok(result, pytester, scenes, ["(invalid spec)"])


@pytest.mark.parametrize("extra, message", [
    ("top_k: 1000000000000000000000000000000", "top_k: an integer of 100 bits is too large"),
    ("top_k: " + "9" * 5000, "top_k"),
    ("focus: {region: {box_rel: [0, 0, 1, 1]}, min_energy: 1.0e+400}", "min_energy: inf is not a finite number"),
    ("focus: {region: {box_rel: [0, 0, 1, 1]}, min_energy: 1e400}", "min_energy: expected a number"),
    ("focus: {region: {box_rel: [0, 0, 1, 1]}, min_energy: .nan}", "min_energy: nan is not a finite number"),
    ("focus: {region: {box: [0, 0, 1.0e+300, 10]}}", "focus.region"),
    ("focus: {region: {box: [0, 0, 9223372036854775807, 10]}}", "focus.region"),
    ("focus: {region: {box_rel: [0, 0, 1, 1]}, pointing_game: true, tolerance_px: 1.0e+308}", None),
    ("expect: {top1: 99999999999}", "top1"),
], ids=["top_k-1e30", "5000-digit-literal", "min_energy-inf", "1e400-is-text", "nan", "box-1e300",
        "box-int64-max", "tolerance-1e308", "class-index-huge"])
def test_huge_numbers_are_spec_errors_or_work_never_crash(pytester, scenes, extra, message):
    good_spec(pytester, scenes)
    (pytester.path / "huge.yaml").write_text(
        f"model: {{arch: shapes_vgg}}\ncases:\n  - id: big\n    image: images/circle-01.png\n    {extra}\n")
    result = run_with_report(pytester)
    got = outcomes_of(result, "huge.yaml")
    assert got, result.stdout.str()[-2000:]
    if message is None:  # a valid (if silly) number: it runs
        assert "error" not in got.values(), result.stdout.str()[-2000:]
    else:
        assert set(got.values()) == {"error"}, got
        lines = error_lines(result, message)
        assert lines and all(line.startswith("huge.yaml:5: ") for line in lines), result.stdout.str()[-2000:]
        assert not any(re.search(r"\d{70}", line) for line in lines), lines  # numbers shown short
        assert all(len(line) < 400 for line in lines), lines
    assert_rest_ok(result, pytester, scenes, [])


# ------------------------------------------------------------------------------------------ ids, paths

def test_unicode_case_id_runs_and_appears_intact_in_the_report(pytester, scenes):
    good_spec(pytester, scenes)
    name, meta = next(iter(scenes.items()))
    write_spec(pytester, "uni.yaml", [good_case(name, meta, id="кот-🐈")])
    result = run_with_report(pytester)
    assert outcomes_of(result, "uni.yaml") == {"uni.yaml::кот-🐈::prediction": "passed",
                                               "uni.yaml::кот-🐈::focus": "passed"}
    report = assert_rest_ok(result, pytester, scenes, ["кот-🐈"])
    assert report.case("кот-🐈")["outcome"] == "passed"
    assert "кот-🐈" in "".join(report.parsed.text)
    for rel in report.case("кот-🐈")["assets"].values():  # asset names are made safe, never the raw id
        if isinstance(rel, str):
            assert rel.isascii(), rel


def test_duplicate_case_id_errors_the_second_and_runs_the_first(pytester, scenes):
    good_spec(pytester, scenes)
    name, meta = next(iter(scenes.items()))
    write_spec(pytester, "dup.yaml", [good_case(name, meta, id="twin"), good_case(name, meta, id="twin")])
    result = run_with_report(pytester)
    got = outcomes_of(result, "dup.yaml")
    assert got["dup.yaml::twin::prediction"] == got["dup.yaml::twin::focus"] == "passed", got
    errors = {k for k, v in got.items() if v == "error"}
    assert errors and all(k.startswith("dup.yaml::cases[1]::") for k in errors), got
    lines = error_lines(result, "duplicate case id 'twin' (first used at line 4)")
    assert lines and all("dup.yaml:" in line for line in lines)
    report = assert_rest_ok(result, pytester, scenes, ["twin", "cases[1]"])
    assert report.case("twin")["outcome"] == "passed" and report.case("cases[1]")["outcome"] == "error"


def test_image_path_leading_outside_the_spec_folder_to_a_non_image_errors_that_case(pytester, scenes):
    (pytester.path / "outside").mkdir()
    notes = pytester.path / "outside" / "notes.txt"
    notes.write_text("not a picture\n")
    name, meta = next(iter(scenes.items()))
    shutil.copytree(pytester.path / "images", pytester.path / "specs" / "images")
    write_spec(pytester, "specs/good.yaml", good_cases(scenes))
    write_spec(pytester, "specs/out.yaml", [{"id": "escape", "image": "../outside/notes.txt",
                                             "expect": {"top1": "circle"}},
                                            good_case(name, meta, id="fine")])
    result = run_with_report(pytester)
    assert_good_cases_passed(result, "specs/good.yaml", scenes)
    assert outcomes_of(result, "specs/out.yaml::escape::") == {"specs/out.yaml::escape::prediction": "error"}
    assert set(outcomes_of(result, "specs/out.yaml::fine::").values()) == {"passed"}
    lines = error_lines(result, "notes.txt")
    assert len(lines) == 1 and "specs/out.yaml:" in lines[0], lines
    assert "not an image" in lines[0] or "outside" in lines[0], lines
    assert_no_traceback(result)
    report = check_report(pytester, GOOD_IDS + ["escape", "fine"])
    assert "notes.txt" in report.case("escape")["error"]
    assert "not a picture" not in report.html  # the file's content never reaches the page


# --------------------------------------------------------------------------------------------- HTML

SCRIPT = "<script>alert(1)</script>"


def test_html_in_case_ids_labels_and_file_names_is_escaped_in_the_report(pytester, scenes):
    good_spec(pytester, scenes)
    name, meta = "circle-01.png", scenes["circle-01.png"]
    evil_image = "<img src=x onerror=alert(2)>.png"
    shutil.copy(SHAPES / name, pytester.path / "images" / evil_image)
    labels = [SCRIPT, "square", "triangle", "star", "cross", "ring"]
    (pytester.path / "labels.json").write_text(json.dumps(labels))
    case = {"id": "<script>alert(1)", "image": f"images/{evil_image}", "expect": {"top1": SCRIPT},
            "focus": {"region": {"box": meta["box"]}, "min_energy": 0.3}}
    # an unknown label written as HTML: its error message (with the label) goes into the report too
    erring = {"id": "<i>err", "image": f"images/{name}",
              "expect": {"not_in_top_k": ['<b onmouseover="alert(3)">x</b>']}}
    write_spec(pytester, "xss.yaml", [case, erring], model={"arch": "shapes_vgg", "labels": "labels.json"})
    result = run_with_report(pytester)
    got = outcomes_of(result, "xss.yaml")
    assert got == {"xss.yaml::<script>alert(1)::prediction": "passed",  # the labels file was used
                   "xss.yaml::<script>alert(1)::focus": "passed",
                   "xss.yaml::<i>err::prediction": "error"}, result.stdout.str()[-2000:]
    report = assert_rest_ok(result, pytester, scenes, ["<script>alert(1)", "<i>err"])
    assert "onmouseover" in report.case("<i>err")["error"]
    # the page's own inline script (with its CSP nonce) is the only script element
    assert len(report.parsed.scripts) == 1 and report.parsed.scripts[0].get("nonce"), report.parsed.scripts
    html = report.html
    assert SCRIPT not in html and "<script>alert(1)" not in html
    assert not report.parsed.handlers, report.parsed.handlers  # no onerror/onmouseover made it into markup
    assert "<img src=x" not in html and "<b onmouseover" not in html and "<i>err" not in html
    text = "".join(report.parsed.text)
    assert SCRIPT in text and evil_image in text and "<i>err" in text  # shown to the reader as text, escaped in the markup
    assert "&lt;script&gt;alert(1)" in html


# ------------------------------------------------------------------------------------------- models

def test_checkpoint_for_another_architecture_names_arch_missing_and_unexpected_keys(pytester, scenes):
    good_spec(pytester, scenes)
    name, meta = next(iter(scenes.items()))
    torch.save(torchvision.models.squeezenet1_1(weights=None, num_classes=6).state_dict(),
               pytester.path / "squeeze.pt")
    write_spec(pytester, "arch.yaml", [good_case(name, meta, id="a"), good_case(name, meta, id="b")],
               model={"arch": "resnet18", "checkpoint": "squeeze.pt"})
    result = run_with_report(pytester)
    got = outcomes_of(result, "arch.yaml")
    assert got and set(got.values()) == {"error"}, got
    lines = [line for line in result.stdout.lines if "does not fit resnet18" in line and not line.startswith("ERROR ")]
    assert lines, result.stdout.str()[-3000:]
    line = lines[0]
    assert line.startswith("arch.yaml:") and "squeeze.pt" in line and "missing key" in line and "unexpected key" in line
    assert "conv1.weight" in line and "features.0.weight" in line
    assert len(line) < 1200, f"one message, a few keys each: {len(line)} chars"
    assert len({ln for ln in lines}) == 1  # every item of that spec says the same one thing
    assert_rest_ok(result, pytester, scenes, ["a", "b"])


class _Evil:
    """Unpickling this runs a shell command: exactly what weights_only must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class _TrainingMeta:
    """An ordinary object of the user's own code saved next to the weights."""

    note: str


@pytest.mark.parametrize("payload", [
    pytest.param("object", id="custom-object"),
    pytest.param("os.system", id="os-system-reduce"),
])
def test_checkpoint_pickling_arbitrary_objects_is_refused_and_never_executed(pytester, scenes, tmp_path,
                                                                           payload):
    good_spec(pytester, scenes)
    name, meta = next(iter(scenes.items()))
    marker = tmp_path / "pwned"
    extra = _Evil(marker) if payload == "os.system" else _TrainingMeta("lr=0.1")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": extra}, pytester.path / "evil.pt")
    write_spec(pytester, "pickle.yaml", [good_case(name, meta, id="a")],
               model={"arch": "shapes_vgg", "checkpoint": "evil.pt"})
    result = run_with_report(pytester)
    assert not marker.exists()
    assert set(outcomes_of(result, "pickle.yaml").values()) == {"error"}
    assert_rest_ok(result, pytester, scenes, ["a"])
    lines = error_lines(result, "evil.pt")
    assert lines and lines[0].startswith("pickle.yaml:"), result.stdout.str()[-2000:]
    assert "arbitrary Python objects" in lines[0] and "refused" in lines[0], lines[0]
    assert "weights_only` set to `False" not in lines[0]  # never advise the unsafe way out


def test_weights_not_available_offline_skip_with_one_line_and_strict_errors(pytester, scenes, monkeypatch,
                                                                          tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MODEL_AUDIT_OFFLINE", "1")
    good_spec(pytester, scenes)
    name, meta = next(iter(scenes.items()))
    write_spec(pytester, "net.yaml", [good_case(name, meta, id="a", expect={"top1": 0})],
               model={"arch": "resnet18", "weights": "IMAGENET1K_V1"})
    result = run_with_report(pytester, "-rs")
    assert set(outcomes_of(result, "net.yaml").values()) == {"skipped"}
    summary = [line for line in result.stdout.lines if line.startswith("model-audit: 2 checks did not run")]
    assert len(summary) == 1, result.stdout.str()[-2000:]
    assert "resnet18" in summary[0] and "not available" in summary[0] and str(tmp_path / "torch") in summary[0]
    assert "hub/checkpoints/resnet18-" in summary[0] and "TORCH_HOME" in summary[0]
    report = assert_rest_ok(result, pytester, scenes, ["a"])
    assert report.case("a")["outcome"] == "skipped"

    strict = run_with_report(pytester, "--audit-strict")
    assert set(outcomes_of(strict, "net.yaml").values()) == {"error"}
    good = {k: v for k, v in outcomes_of(strict, "good.yaml").items() if not k.endswith("::baseline")}
    assert set(good.values()) == {"passed"} and len(good) == 2 * len(scenes), good
    # and under --audit-strict a case without a recorded baseline is an error, never a pass
    assert {v for k, v in outcomes_of(strict, "good.yaml").items() if k.endswith("::baseline")} == {"error"}
    assert_no_traceback(strict)
    assert check_report(pytester, GOOD_IDS + ["a"]).case("a")["outcome"] == "error"


def test_report_folder_that_cannot_be_written_is_a_usage_error_before_any_model_runs(pytester, scenes):
    good_spec(pytester, scenes)
    (pytester.path / "afile").write_text("a file, not a folder")
    result = pytester.runpytest("--audit-report", "afile/reports", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "afile/reports" in err and "not writable" in err
    assert len([line for line in result.stderr.lines if "not writable" in line]) == 1
    assert "model load" not in result.stdout.str() and not item_outcomes(result)
    assert "Traceback" not in err + result.stdout.str()
