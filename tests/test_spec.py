"""Spec loading: safe YAML with lines, schema and semantic validation, typed dataclasses."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from audit.errors import SpecError
from audit.baselines import BaselineTolerance
from audit.kinds.focus import Focus
from audit.kinds.prediction import Expect
from audit.regions import Box, MaskFile, Polygon, RelBox, Union
from audit.spec import (SCHEMA_PATH, CaseSpec, FeatureRequest, Location,
                        ModelSpec, Spec, is_spec_file, load_spec)

MODEL = "model:\n  arch: shapes_vgg\n"


@pytest.fixture(scope="module", autouse=True, params=["libyaml", "python"])
def yaml_parser(request):
    """Every test twice: with libyaml's parser (when PyYAML has it) and with PyYAML's pure-Python one."""
    from audit.spec import yaml_positions

    if request.param == "libyaml" and not getattr(yaml, "__with_libyaml__", False):
        pytest.skip("PyYAML was built without libyaml")
    loader = yaml_positions._CSpecLoader if request.param == "libyaml" else yaml_positions._PySpecLoader
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(yaml_positions, "_SpecLoader", loader)
        yield request.param

FULL = """\
# specs/shapes/basic.yaml
model:
  arch: shapes_vgg
  weights: DEFAULT
  preprocess: squash
  cam_layer: features.29
  labels: labels.json
  seed: 0
defaults:
  top_k: 3
  focus:
    tolerance_px: 2
marks: [slow]
baseline:
  max_prob_drift: 0.1
cases:
  - id: circle-01
    image: images/circle-01.png
    top_k: 5
    expect:
      top1: circle
      in_top_k: [circle, ring]
      any_in_top_k: [ring, 3]
      not_in_top_k: [star]
      min_prob: 0.5
    focus:
      target: circle
      region: {box: [12, 20, 40, 48]}
      min_energy: 0.4
      pointing_game: true
      min_iou: 0.2
      iou_threshold: 0.6
      min_rank_accuracy: 0.3
      avoid: {box_rel: [0, 0, 0.15, 0.15]}
      max_energy_in_avoid: 0.1
    features: [features.4, {layer: features.21, max_channels: 72}]
    marks: [fast]
    baseline:
      top1_must_match: false
      min_topk_overlap: 0.8
      min_heatmap_correlation: 0.9
      min_hot_iou: 0.5
  - id: circle-02
    image: images/circle-02.png
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml",
          files: tuple[str, ...] = ("images/circle-01.png", "images/circle-02.png", "labels.json",
                                    "img.png")) -> Path:
    """A spec file plus the (empty) files it refers to: the loader checks existence, never content."""
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def spec_with_cases(tmp_path: Path, cases: str, head: str = MODEL, **kw) -> Path:
    return write(tmp_path, head + "cases:\n" + textwrap.indent(textwrap.dedent(cases), "  "), **kw)


def one_case(tmp_path: Path, body: str, head: str = MODEL) -> CaseSpec:
    """Load a spec whose only case is ``- id: c`` / ``image: img.png`` plus ``body``."""
    text = "- id: c\n  image: img.png\n" + textwrap.indent(textwrap.dedent(body), "  ")
    return load_spec(spec_with_cases(tmp_path, text, head)).cases[0]


def spec_error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value


# --------------------------------------------------------------------------------------------------
# valid specs


def test_full_spec_round_trips_into_typed_dataclasses(tmp_path):
    spec = load_spec(write(tmp_path, FULL))
    assert isinstance(spec, Spec) and spec.path == tmp_path / "spec.yaml"
    assert spec.marks == ("slow",)
    assert spec.model == ModelSpec(arch="shapes_vgg", weights="DEFAULT", checkpoint=None, preprocess="squash",
                                   cam_layer="features.29", labels=tmp_path / "labels.json", seed=0,
                                   location=spec.model.location)
    assert spec.model.location == Location(tmp_path / "spec.yaml", 2, "model")
    first, second = spec.cases
    assert first.error is None and second.error is None
    assert first.id == "circle-01" and first.image == tmp_path / "images" / "circle-01.png"
    assert first.top_k == 5
    assert first.checks["prediction"] == Expect(top1="circle", in_top_k=("circle", "ring"), any_in_top_k=("ring", 3),
                                  not_in_top_k=("star",), min_prob=0.5)
    assert first.checks["focus"] == Focus(target="circle", region=Box(12, 20, 40, 48), min_energy=0.4,
                                pointing_game=True, tolerance_px=2.0, min_iou=0.2, iou_threshold=0.6,
                                min_rank_accuracy=0.3, avoid=RelBox(0, 0, 0.15, 0.15),
                                max_energy_in_avoid=0.1)
    assert first.features == (FeatureRequest("features.4"), FeatureRequest("features.21", 72))
    assert first.marks == ("slow", "fast")
    assert first.checks["baseline"] == BaselineTolerance(top1_must_match=False, min_topk_overlap=0.8, max_prob_drift=0.1,
                                               min_heatmap_correlation=0.9, min_hot_iou=0.5)
    assert second.top_k == 3 and second.checks["prediction"] is None and second.checks["focus"] is None and second.features == ()


def test_spec_without_optional_keys_gets_documented_defaults(tmp_path):
    case = one_case(tmp_path, "")
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.model.weights is None and spec.model.preprocess == "squash" and spec.model.seed is None
    assert case.top_k == 5 and case.marks == () and case.checks["baseline"] is None
    assert BaselineTolerance() == BaselineTolerance(True, 0.6, 0.15, 0.7, 0.4)


def test_line_numbers_of_nested_keys_are_one_based_and_exact(tmp_path):
    case = load_spec(write(tmp_path, FULL)).cases[0]
    assert case.location.line == 17 and case.location.key_path == "cases[0]"
    assert case.line_of("expect.top1") == 21
    assert case.line_of("focus.region.box") == 28
    assert case.line_of("focus.avoid.box_rel[2]") == 34
    assert case.line_of("features[1].max_channels") == 36
    assert case.line_of("baseline.min_hot_iou") == 42
    assert case.lines["image"] == 18


def test_line_of_falls_back_to_parent_key_then_case_line(tmp_path):
    case = load_spec(write(tmp_path, FULL)).cases[0]
    assert case.line_of("expect.nope") == 20
    assert case.line_of("nothing.here") == 17


def test_inherited_keys_point_at_the_defaults_and_spec_level_lines(tmp_path):
    second = load_spec(write(tmp_path, FULL)).cases[1]
    assert second.line_of("top_k") == 10
    assert second.line_of("baseline.max_prob_drift") == 15


def test_location_prints_as_path_colon_line(tmp_path):
    assert str(Location(Path("specs/a.yaml"), 7, "cases[0]")) == "specs/a.yaml:7"


def test_spec_dataclasses_are_frozen(tmp_path):
    case = one_case(tmp_path, "")
    with pytest.raises(AttributeError):
        case.top_k = 3  # type: ignore[misc]


def test_paths_resolve_relative_to_the_spec_file_not_the_cwd(tmp_path, monkeypatch):
    path = write(tmp_path, MODEL + "cases:\n  - {id: a, image: ../img.png}\n", name="sub/spec.yaml")
    monkeypatch.chdir("/")
    case = load_spec(path).cases[0]
    assert case.error is None and case.image == tmp_path / "img.png"


def test_checkpoint_resolves_relative_to_the_spec_file(tmp_path):
    path = write(tmp_path, "model: {arch: vgg16, checkpoint: w/model.pt}\ncases: [{id: a, image: img.png}]\n",
                 files=("img.png", "w/model.pt"))
    assert load_spec(path).model.checkpoint == tmp_path / "w" / "model.pt"


# --------------------------------------------------------------------------------------------------
# defaults and merging


def test_case_keys_override_defaults_and_mappings_merge_key_by_key(tmp_path):
    head = MODEL + textwrap.dedent("""\
        defaults:
          top_k: 10
          expect: {min_prob: 0.3, top1: circle}
          focus: {region: {box: [0, 0, 5, 5]}, min_iou: 0.1}
          baseline: {max_prob_drift: 0.05}
          features: [features.4]
        """)
    case = one_case(tmp_path, """\
        top_k: 2
        expect: {top1: ring}
        focus: {min_energy: 0.7}
        baseline: {min_hot_iou: 0.9}
        """, head)
    assert case.top_k == 2
    assert case.checks["prediction"] == Expect(top1="ring", min_prob=0.3)
    assert case.checks["focus"].region == Box(0, 0, 5, 5) and case.checks["focus"].min_energy == 0.7
    assert case.checks["focus"].min_iou == 0.1
    assert case.checks["baseline"].max_prob_drift == 0.05 and case.checks["baseline"].min_hot_iou == 0.9
    assert case.features == (FeatureRequest("features.4"),)


def test_a_case_region_replaces_the_default_region_rather_than_merging_into_it(tmp_path):
    head = MODEL + "defaults:\n  focus: {region: {box: [0, 0, 5, 5]}}\n"
    case = one_case(tmp_path, "focus: {region: {polygon: [[0, 0], [4, 0], [4, 4]]}}\n", head)
    assert case.error is None and case.checks["focus"].region == Polygon(((0, 0), (4, 0), (4, 4)))


def test_spec_level_marks_are_added_to_case_marks(tmp_path):
    case = one_case(tmp_path, "marks: [fast, slow]\n", MODEL + "marks: [slow, gpu]\n")
    assert case.marks == ("slow", "gpu", "fast")


def test_baseline_precedence_is_case_then_defaults_then_spec_level(tmp_path):
    head = MODEL + ("baseline: {max_prob_drift: 0.3, min_hot_iou: 0.3, min_topk_overlap: 0.3}\n"
                    "defaults:\n  baseline: {max_prob_drift: 0.2, min_hot_iou: 0.2}\n")
    case = one_case(tmp_path, "baseline: {max_prob_drift: 0.1}\n", head)
    assert (case.checks["baseline"].max_prob_drift, case.checks["baseline"].min_hot_iou, case.checks["baseline"].min_topk_overlap) == \
        (0.1, 0.2, 0.3)


def test_yaml_merge_keys_work_and_explicit_keys_win(tmp_path):
    path = spec_with_cases(tmp_path, """\
        - &first {id: a, image: img.png, top_k: 3}
        - <<: *first
          id: b
        """)
    cases = load_spec(path).cases
    assert [(c.id, c.top_k, c.error) for c in cases] == [("a", 3, None), ("b", 3, None)]


# --------------------------------------------------------------------------------------------------
# focus defaults and rules


def test_region_without_metric_gets_the_default_energy_floor(tmp_path):
    focus = one_case(tmp_path, "focus: {region: {box: [0, 0, 5, 5]}}\n").checks["focus"]
    assert focus.min_energy == 0.5 and focus.pointing_game is False and focus.min_iou is None


def test_region_with_another_metric_gets_no_energy_floor(tmp_path):
    focus = one_case(tmp_path, "focus: {region: {box: [0, 0, 5, 5]}, pointing_game: true}\n").checks["focus"]
    assert focus.min_energy is None and focus.pointing_game is True


def test_avoid_without_ceiling_gets_the_default_ceiling_and_needs_no_region(tmp_path):
    case = one_case(tmp_path, "focus: {avoid: {box_rel: [0, 0, 0.2, 0.2]}}\n")
    assert case.error is None
    assert case.checks["focus"].region is None and case.checks["focus"].min_energy is None
    assert case.checks["focus"].max_energy_in_avoid == 0.2


def test_region_list_is_kept_as_a_tuple_of_shapes(tmp_path):
    focus = one_case(tmp_path, "focus:\n  region: [{box: [0, 0, 5, 5]}, {mask: img.png}]\n").checks["focus"]
    assert focus.region == Union((Box(0, 0, 5, 5), MaskFile("img.png")))


def test_focus_metric_without_region_is_a_case_error(tmp_path):
    case = one_case(tmp_path, "focus:\n  min_iou: 0.3\n")
    assert case.error is not None and case.error.key_path == "cases[0].focus.min_iou"
    assert case.error.line == 7 and "needs a region" in case.error.message


def test_ceiling_without_avoid_region_is_a_case_error(tmp_path):
    case = one_case(tmp_path, "focus: {region: {box: [0, 0, 5, 5]}, max_energy_in_avoid: 0.1}\n")
    assert "needs an avoid region" in case.error.message


def test_focus_metrics_in_defaults_apply_only_to_cases_with_a_region(tmp_path):
    head = MODEL + "defaults:\n  focus: {min_iou: 0.3}\n"
    path = spec_with_cases(tmp_path, """\
        - {id: plain, image: img.png}
        - {id: boxed, image: img.png, focus: {region: {box: [0, 0, 5, 5]}}}
        """, head)
    plain, boxed = load_spec(path).cases
    assert plain.error is None and plain.checks["focus"] is None
    assert boxed.checks["focus"].min_iou == 0.3 and boxed.checks["focus"].min_energy is None


# --------------------------------------------------------------------------------------------------
# YAML level errors (the whole file)


def test_syntax_error_reports_the_line_of_the_problem(tmp_path):
    err = spec_error(write(tmp_path, MODEL + "cases:\n  - id: a\n    image: [unclosed\n  - id: b\n"))
    assert err.path == tmp_path / "spec.yaml" and err.line in (5, 6)
    assert "YAML syntax error" in err.message
    assert str(err).startswith(f"{tmp_path / 'spec.yaml'}:{err.line}: ")


@pytest.mark.parametrize("opened", ["expect: {top1: circle", "image: [img.png", 'id: "a'])
def test_a_bracket_or_quote_left_open_at_the_end_is_reported_where_it_was_opened(tmp_path, opened):
    err = spec_error(write(tmp_path, MODEL + f"cases:\n  - image: img.png\n    {opened}\n\n"))
    assert err.line == 5
    assert "(the file ends before it is closed; opened on line 5)" in err.message


def test_tab_indentation_is_a_syntax_error_with_its_line(tmp_path):
    err = spec_error(write(tmp_path, MODEL + "cases:\n\t- id: a\n"))
    assert err.line == 4


def test_duplicate_keys_are_refused_at_the_second_one(tmp_path):
    err = spec_error(spec_with_cases(tmp_path, "- id: a\n  image: img.png\n  image: other.png\n"))
    assert err.line == 6 and err.key_path == "cases[0].image"
    assert "duplicate key 'image' (first at line 5)" in err.message


def test_duplicate_keys_in_flow_mappings_are_refused(tmp_path):
    err = spec_error(spec_with_cases(tmp_path, "- {id: a, image: img.png, id: b}\n"))
    assert "duplicate key 'id'" in err.message


def test_python_object_apply_is_refused_and_never_executed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    marker = tmp_path / "pwned"
    path = spec_with_cases(tmp_path, f"- id: !!python/object/apply:os.system ['touch {marker}']\n  image: img.png\n")
    err = spec_error(path)
    assert err.message == "tag !!python/object/apply:os.system is not allowed: specs are loaded safely"
    assert err.line == 4 and err.key_path == "cases[0].id"
    assert calls == [] and not marker.exists()


@pytest.mark.parametrize("value", ["!!python/name:os.system ''", "!!python/object:pathlib.Path {}",
                                   "!custom thing", "!!binary aGVsbG8=", "!!set {a: null}",
                                   "!!omap [{a: 1}]"])
def test_non_standard_tags_are_refused(tmp_path, value):
    err = spec_error(spec_with_cases(tmp_path, f"- id: a\n  image: img.png\n  top_k: {value}\n"))
    assert "is not allowed: specs are loaded safely" in err.message and err.line == 6


def test_standard_tags_are_accepted(tmp_path):
    case = one_case(tmp_path, "top_k: !!int '7'\nmarks: !!seq [slow]\n")
    assert case.top_k == 7 and case.marks == ("slow",)


def test_loader_leaves_pyyaml_globals_untouched(tmp_path):
    before = (dict(yaml.SafeLoader.yaml_constructors), dict(yaml.Loader.yaml_constructors),
              dict(yaml.SafeLoader.yaml_implicit_resolvers))
    load_spec(write(tmp_path, FULL))
    assert before == (dict(yaml.SafeLoader.yaml_constructors), dict(yaml.Loader.yaml_constructors),
                      dict(yaml.SafeLoader.yaml_implicit_resolvers))


def test_alias_bomb_is_refused_quickly(tmp_path, monkeypatch):
    """Refused after a bounded amount of work (counted, not timed: timings are noise on shared cores)."""
    from audit.spec import yaml_positions as S

    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path = write(tmp_path, MODEL + "\n".join(lines) + "\ncases: [{id: a, image: img.png}]\n")
    calls = []
    real = S._SpecBuilder.build
    monkeypatch.setattr(S._SpecBuilder, "build", lambda self, *a: calls.append(1) or real(self, *a))
    err = spec_error(path)
    assert "expands to more than" in err.message
    assert len(calls) <= S.MAX_NODES + 1000   # 9**10 values would have been built without the budget


def test_deep_nesting_is_refused_without_recursion_error(tmp_path):
    err = spec_error(write(tmp_path, "cases: " + "[" * 3000 + "]" * 3000 + "\n"))
    assert "nested" in err.message or "nesting depth" in err.message   # ours, or libyaml's own limit


@pytest.mark.parametrize("text", ["cases: &a [*a]\n", "cases: &a {<<: *a}\n", "cases: &a {x: [*a]}\n"])
def test_self_referencing_anchors_are_refused(tmp_path, text):
    err = spec_error(write(tmp_path, text))
    assert "anchor used inside itself" in err.message and len(str(err)) < 400


def test_empty_file_is_an_empty_spec_error(tmp_path):
    assert "empty spec" in spec_error(write(tmp_path, "")).message


@pytest.mark.parametrize("text", ["# only a comment\n", "---\n", "null\n"])
def test_documents_without_content_are_empty_spec_errors(tmp_path, text):
    assert "empty spec" in spec_error(write(tmp_path, text)).message


def test_multi_document_yaml_is_refused_at_the_second_document(tmp_path):
    err = spec_error(write(tmp_path, MODEL + "cases: [{id: a, image: img.png}]\n---\n" + MODEL))
    assert "second" in err.message and err.line == 4


def test_top_level_list_is_refused(tmp_path):
    assert "a spec is a mapping" in spec_error(write(tmp_path, "- cases\n")).message


def test_non_text_keys_are_refused(tmp_path):
    err = spec_error(spec_with_cases(tmp_path, "- id: a\n  image: img.png\n  1: x\n"))
    assert "must be text" in err.message and err.line == 6


def test_non_utf8_file_is_a_spec_error(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"model: {arch: \xff}\n")
    assert "not UTF-8" in spec_error(path).message


def test_missing_spec_file_is_a_spec_error(tmp_path):
    assert "cannot read" in spec_error(tmp_path / "nope.yaml").message


# --------------------------------------------------------------------------------------------------
# schema errors


@pytest.mark.parametrize("text, line, key_path, suggestion", [
    (MODEL + "cases: [{id: a, image: img.png}]\nmarkz: [slow]\n", 4, "markz", "marks"),
    ("model:\n  arch: shapes_vgg\n  wieghts: DEFAULT\ncases: [{id: a, image: img.png}]\n", 3, "model.wieghts",
     "weights"),
])
def test_unknown_spec_level_key_raises_with_suggestion(tmp_path, text, line, key_path, suggestion):
    err = spec_error(write(tmp_path, text))
    assert (err.line, err.key_path) == (line, key_path)
    assert err.message == f"unknown key; did you mean {suggestion!r}?"


def test_misspelt_required_key_is_reported_once_as_unknown_key(tmp_path):
    err = spec_error(write(tmp_path, "modle: {arch: vgg16}\ncases: [{id: a, image: img.png}]\n"))
    assert str(err) == f"{tmp_path / 'spec.yaml'}:1: modle: unknown key; did you mean 'model'?"


def test_unknown_key_in_a_case_is_a_case_error_with_suggestion(tmp_path):
    case = one_case(tmp_path, "top_kk: 3\n")
    assert str(case.error) == f"{tmp_path / 'spec.yaml'}:6: cases[0].top_kk: unknown key; did you mean 'top_k'?"


def test_unknown_focus_key_suggests_the_closest_metric(tmp_path):
    case = one_case(tmp_path, "focus:\n  region: {box: [0, 0, 5, 5]}\n  min_energi: 0.4\n")
    assert case.error.line == 8 and case.error.key_path == "cases[0].focus.min_energi"
    assert case.error.message == "unknown key; did you mean 'min_energy'?"


def test_unrelated_unknown_key_lists_the_allowed_keys(tmp_path):
    case = one_case(tmp_path, "expect: {zzzzzz: 1}\n")
    assert case.error.message.startswith("unknown key; allowed here: top1, in_top_k")


def test_wrong_type_names_expected_and_found(tmp_path):
    case = one_case(tmp_path, "top_k: five\n")
    assert case.error.message == "expected an integer, got text ('five')"
    assert case.error.key_path == "cases[0].top_k" and case.error.line == 6


def test_out_of_range_probability_message(tmp_path):
    case = one_case(tmp_path, "expect:\n  top1: circle\n  min_prob: 1.5\n")
    assert str(case.error) == \
        f"{tmp_path / 'spec.yaml'}:8: cases[0].expect.min_prob: 1.5 is greater than the maximum of 1"


@pytest.mark.parametrize("top_k", [0, 1001])
def test_top_k_outside_1_to_1000_is_refused(tmp_path, top_k):
    assert "top_k" in one_case(tmp_path, f"top_k: {top_k}\n").error.key_path


def test_enum_error_lists_the_allowed_values(tmp_path):
    err = spec_error(write(tmp_path, "model:\n  arch: vgg16\n  preprocess: crop\ncases: [{id: a, image: img.png}]\n"))
    assert str(err) == f"{tmp_path / 'spec.yaml'}:3: model.preprocess: 'crop' is not one of 'squash', 'weights'"


def test_missing_required_case_key_is_a_case_error_at_the_case_line(tmp_path):
    case = load_spec(spec_with_cases(tmp_path, "- id: a\n")).cases[0]
    assert case.error.message == "missing required key 'image'" and case.error.line == 4


def test_missing_model_is_a_spec_error(tmp_path):
    assert "missing required key 'model'" in spec_error(write(tmp_path, "cases: [{id: a, image: img.png}]\n")).message


def test_empty_cases_list_is_a_spec_error(tmp_path):
    assert spec_error(write(tmp_path, MODEL + "cases: []\n")).key_path == "cases"


def test_region_with_two_shapes_asks_for_a_list(tmp_path):
    case = one_case(tmp_path, "focus: {region: {box: [0, 0, 5, 5], box_rel: [0, 0, 1, 1]}}\n")
    assert "use a list of regions for a union" in case.error.message


def test_box_needs_exactly_four_numbers(tmp_path):
    case = one_case(tmp_path, "focus: {region: {box: [0, 0, 5]}}\n")
    assert case.error.message == "needs exactly 4 item(s), got 3"
    assert case.error.key_path == "cases[0].focus.region.box"


def test_box_rel_outside_zero_one_is_refused(tmp_path):
    case = one_case(tmp_path, "focus: {region: {box_rel: [0, 0, 1.5, 1]}}\n")
    assert case.error.key_path == "cases[0].focus.region.box_rel[2]"


def test_polygon_needs_three_points(tmp_path):
    case = one_case(tmp_path, "focus: {region: {polygon: [[0, 0], [4, 4]]}}\n")
    assert "at least 3" in case.error.message


def test_invalid_marker_name_is_refused(tmp_path):
    assert "marker name" in one_case(tmp_path, "marks: [not-a-name]\n").error.message


def test_several_problems_of_one_case_are_reported_together(tmp_path):
    case = one_case(tmp_path, "top_k: 0\nexpect: {min_prob: 2}\n")
    text = str(case.error)
    assert "top_k" in text and "min_prob" in text and "1 more problem" in text


# --------------------------------------------------------------------------------------------------
# numbers


def test_huge_integer_is_a_case_error_not_a_crash(tmp_path):
    case = one_case(tmp_path, "top_k: 1000000000000000000000000000000\n")
    assert "too large" in case.error.message and case.error.key_path == "cases[0].top_k"


def test_integer_literal_with_thousands_of_digits_is_a_spec_error(tmp_path):
    err = spec_error(spec_with_cases(tmp_path, "- {id: a, image: img.png, top_k: " + "9" * 5000 + "}\n"))
    assert "cannot read" in err.message and len(str(err)) < 300


def test_huge_seed_is_a_spec_error(tmp_path):
    err = spec_error(write(tmp_path, "model: {arch: vgg16, seed: 99999999999999999999999}\n"
                                     "cases: [{id: a, image: img.png}]\n"))
    assert err.key_path == "model.seed" and "too large" in err.message


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1.0e+999"])
def test_non_finite_numbers_are_case_errors(tmp_path, value):
    case = one_case(tmp_path, f"expect: {{min_prob: {value}}}\n")
    assert "is not a finite number" in case.error.message and case.error.key_path == "cases[0].expect.min_prob"


def test_nan_in_a_box_is_caught(tmp_path):
    case = one_case(tmp_path, "focus: {region: {box: [0, 0, .nan, 5]}}\n")
    assert case.error.key_path == "cases[0].focus.region.box[2]"


# --------------------------------------------------------------------------------------------------
# semantic checks


def test_duplicate_case_id_is_an_error_on_the_second_case_naming_the_first_line(tmp_path):
    path = spec_with_cases(tmp_path, "- {id: a, image: img.png}\n- {id: b, image: img.png}\n"
                                     "- {id: a, image: img.png}\n")
    a, b, again = load_spec(path).cases
    assert a.error is None and b.error is None
    assert again.error.line == 6 and again.error.key_path == "cases[2].id"
    assert "duplicate case id 'a' (first used at line 4)" in again.error.message
    assert again.id == "cases[2]"


def test_weights_and_checkpoint_are_exclusive(tmp_path):
    path = write(tmp_path, "model:\n  arch: vgg16\n  weights: DEFAULT\n  checkpoint: m.pt\n"
                           "cases: [{id: a, image: img.png}]\n",
                 files=("img.png", "m.pt"))
    err = spec_error(path)
    assert err.line == 4 and err.key_path == "model.checkpoint" and "weights at line 3" in err.message


def test_missing_checkpoint_is_a_spec_error_with_the_resolved_path(tmp_path):
    err = spec_error(write(tmp_path, "model: {arch: vgg16, checkpoint: m.pt}\ncases: [{id: a, image: img.png}]\n"))
    assert f"not found: {tmp_path / 'm.pt'}" in err.message


def test_missing_labels_file_is_a_spec_error(tmp_path):
    err = spec_error(write(tmp_path, "model: {arch: vgg16, labels: nope.json}\ncases: [{id: a, image: img.png}]\n"))
    assert err.key_path == "model.labels"


def test_missing_image_is_a_case_error_with_the_resolved_path(tmp_path):
    path = spec_with_cases(tmp_path, "- {id: ok, image: img.png}\n- {id: gone, image: pics/gone.png}\n")
    ok, gone = load_spec(path).cases
    assert ok.error is None
    assert gone.id == "gone" and gone.image == tmp_path / "pics" / "gone.png"
    assert gone.error.message == f"image not found: {tmp_path / 'pics' / 'gone.png'}"
    assert gone.error.key_path == "cases[1].image" and gone.error.line == 5


def test_image_that_is_a_folder_is_a_case_error(tmp_path):
    (tmp_path / "dir").mkdir()
    case = load_spec(spec_with_cases(tmp_path, "- {id: a, image: dir}\n")).cases[0]
    assert case.error.message == f"image {tmp_path / 'dir'} is not a file"


def test_image_outside_the_spec_folder_is_allowed(tmp_path):
    path = write(tmp_path, MODEL + "cases: [{id: a, image: ../img.png}]\n", name="specs/s.yaml")
    assert load_spec(path).cases[0].error is None


def test_missing_image_is_reported_with_other_problems_of_the_case(tmp_path):
    case = load_spec(spec_with_cases(tmp_path, "- {id: a, image: gone.png, top_k: 0}\n")).cases[0]
    assert "image not found" in str(case.error) and "top_k" in str(case.error)


def test_missing_mask_file_is_a_case_error(tmp_path):
    assert "mask not found" in one_case(tmp_path, "focus: {region: {mask: m.png}}\n").error.message


@pytest.mark.parametrize("box", ["[40, 20, 12, 48]", "[12, 20, 12, 48]", "[12, 48, 40, 20]"])
def test_box_with_swapped_or_equal_corners_is_a_case_error(tmp_path, box):
    case = one_case(tmp_path, f"focus:\n  region: {{box: {box}}}\n")
    assert "x0 < x1 and y0 < y1" in case.error.message
    assert case.error.key_path == "cases[0].focus.region.box" and case.error.line == 7


def test_bad_box_in_a_region_list_names_its_index(tmp_path):
    case = one_case(tmp_path, "focus:\n  avoid: [{box: [0, 0, 5, 5]}, {box_rel: [0.5, 0, 0.2, 1]}]\n")
    assert case.error.key_path == "cases[0].focus.avoid[1].box_rel"


def test_polygon_with_repeated_points_is_a_case_error(tmp_path):
    assert "distinct" in one_case(tmp_path, "focus: {region: {polygon: [[0, 0], [0, 0], [4, 4]]}}\n").error.message


def test_more_required_labels_than_top_k_is_a_case_error(tmp_path):
    case = one_case(tmp_path, "top_k: 2\nexpect: {top1: a, in_top_k: [b, c]}\n")
    assert "top_k is 2" in case.error.message


def test_label_both_required_and_forbidden_is_a_case_error(tmp_path):
    case = one_case(tmp_path, "expect: {top1: Circle, not_in_top_k: [circle]}\n")
    assert "both required and forbidden" in case.error.message


def test_error_from_an_inherited_default_points_at_the_defaults(tmp_path):
    head = MODEL + "defaults:\n  expect: {in_top_k: [a, b, c]}\n"
    case = one_case(tmp_path, "top_k: 2\n", head)
    assert case.error.key_path == "defaults.expect.in_top_k" and case.error.line == 4


@pytest.mark.parametrize("case_id", ["'has space'", "a/b", "a::b", '"tab\\there"', '"bell\\a"'])
def test_case_ids_unusable_in_pytest_node_ids_are_refused(tmp_path, case_id):
    case = load_spec(spec_with_cases(tmp_path, f"- id: {case_id}\n  image: img.png\n")).cases[0]
    assert "not a valid case id" in case.error.message and case.id == "cases[0]"


@pytest.mark.parametrize("case_id, expected", [("kreis-ö-01", "kreis-ö-01"), ("a:b", "a:b"), ("7", "7"),
                                               ("2024-01-01", "2024-01-01")])
def test_unicode_integer_and_date_like_case_ids_are_accepted_as_text(tmp_path, case_id, expected):
    case = load_spec(spec_with_cases(tmp_path, f"- id: {case_id}\n  image: img.png\n")).cases[0]
    assert case.error is None and case.id == expected


def test_one_bad_case_leaves_the_other_cases_intact(tmp_path):
    path = spec_with_cases(tmp_path, """\
        - {id: good-1, image: img.png, expect: {top1: circle}}
        - {id: bad, image: img.png, expect: {top1: circle, min_prob: 7}}
        - {id: good-2, image: img.png, focus: {region: {box: [0, 0, 5, 5]}}}
        """)
    spec = load_spec(path)
    assert [c.id for c in spec.cases] == ["good-1", "bad", "good-2"]
    assert [c.error is None for c in spec.cases] == [True, False, True]
    assert spec.case_errors == (spec.cases[1].error,)
    assert spec.cases[0].checks["prediction"].top1 == "circle" and spec.cases[2].checks["focus"].min_energy == 0.5


def test_errored_case_keeps_its_marks_for_selection(tmp_path):
    case = load_spec(spec_with_cases(tmp_path, "- {id: a, image: gone.png, marks: [slow]}\n")).cases[0]
    assert case.error is not None and case.marks == ("slow",)


# --------------------------------------------------------------------------------------------------
# model identity


def test_same_model_in_two_spec_files_has_the_same_key(tmp_path):
    first = write(tmp_path, "model: {arch: vgg16, checkpoint: ../m.pt, preprocess: weights}\n"
                  "cases: [{id: a, image: ../img.png}]\n", name="a/s.yaml", files=("img.png", "m.pt"))
    second = write(tmp_path, "model: {arch: vgg16, checkpoint: ../m.pt, cam_layer: features.28}\n"
                   "cases: [{id: a, image: ../img.png}]\n", name="b/s.yaml")
    assert load_spec(first).model.key() == load_spec(second).model.key()
    hash(load_spec(first).model.key())


def test_different_weights_or_seeds_give_different_keys(tmp_path):
    keys = set()
    for i, model in enumerate(["{arch: vgg16, weights: DEFAULT}", "{arch: vgg16, weights: IMAGENET1K_V1}",
                               "{arch: vgg16, weights: null, seed: 1}", "{arch: vgg16, weights: null, seed: 2}"]):
        keys.add(load_spec(write(tmp_path, f"model: {model}\ncases: [{{id: a, image: img.png}}]\n",
                                 name=f"{i}.yaml")).model.key())
    assert len(keys) == 4


# --------------------------------------------------------------------------------------------------
# is_spec_file


def test_is_spec_file_accepts_a_spec(tmp_path):
    assert is_spec_file(write(tmp_path, FULL))


def test_is_spec_file_claims_a_broken_spec_so_its_error_is_reported(tmp_path):
    assert is_spec_file(write(tmp_path, "model: {arch: [\ncases:\n  - id: a\n\t  bad\n", name="broken.yml"))


@pytest.mark.parametrize("text", [
    "version: '3'\nservices:\n  web:\n    image: nginx\n    ports: ['80:80']\n",
    "name: CI\non: [push]\njobs:\n  test:\n    runs-on: ubuntu-latest\n    steps:\n      - run: pytest\n",
    "jobs:\n  cases:\n    - a\n",
    "{{ not yaml at all: [\n",
])
def test_is_spec_file_rejects_unrelated_yaml(tmp_path, text):
    assert not is_spec_file(write(tmp_path, text, name="other.yaml"))


def test_is_spec_file_rejects_other_suffixes_missing_files_and_binary(tmp_path):
    assert not is_spec_file(write(tmp_path, FULL, name="spec.txt"))
    assert not is_spec_file(tmp_path / "missing.yaml")
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    assert not is_spec_file(tmp_path / "bin.yaml")
    assert not is_spec_file(tmp_path)


# --------------------------------------------------------------------------------------------------
# the schema itself


def _object_schemas(node, where="#"):
    if isinstance(node, dict):
        if "properties" in node:
            yield where, node
        for key, value in node.items():
            yield from _object_schemas(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _object_schemas(value, f"{where}/{i}")


def test_schema_is_valid_draft_2020_12_with_an_id():
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema") and schema["$id"]


def test_every_schema_object_is_closed_and_every_key_is_described():
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    for where, node in _object_schemas(schema):
        if where.endswith("/properties"):
            continue  # a property literally named "properties" does not exist in our format
        assert node.get("additionalProperties") is False, where
        for name, prop in node["properties"].items():
            target = prop
            if "$ref" in prop and "description" not in prop:
                target = schema
                for part in prop["$ref"].lstrip("#/").split("/"):
                    target = target[part]
            assert target.get("description"), f"{where}/properties/{name}"


def test_the_documented_example_validates_against_the_schema(tmp_path):
    data = yaml.safe_load(FULL)
    assert list(Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))).iter_errors(data)) == []


# --------------------------------------------------------------------------------------------------
# property tests: nothing but SpecError escapes


SPEC_WORDS = ["model", "arch", "weights", "checkpoint", "preprocess", "cases", "id", "image", "top_k",
              "expect", "top1", "in_top_k", "focus", "region", "box", "box_rel", "polygon", "mask", "avoid",
              "min_energy", "max_energy_in_avoid", "features", "layer", "max_channels", "marks", "baseline",
              "defaults", "seed", "labels", "min_prob", "pointing_game", "not_in_top_k"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                    st.sampled_from(["img.png", "squash", "circle", "features.4", "slow"]))
keys = st.one_of(st.sampled_from(SPEC_WORDS), st.text(max_size=8))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                          st.dictionaries(keys, inner, max_size=6)),
                         max_leaves=40)
spec_like = st.fixed_dictionaries(
    {"model": st.one_of(st.fixed_dictionaries({"arch": st.text(max_size=8)},
                                              optional={"weights": scalars, "preprocess": scalars, "seed": scalars}),
                        documents),
     "cases": st.lists(st.one_of(st.fixed_dictionaries({"id": scalars, "image": st.just("img.png")},
                                                       optional={k: documents for k in ("expect", "focus", "top_k",
                                                                                        "features", "marks",
                                                                                        "baseline")}),
                                 documents), max_size=3)},
    optional={"defaults": documents, "marks": documents, "baseline": documents})

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_or_spec_error(path: Path) -> None:
    try:
        load_spec(path)
    except SpecError:
        pass


@PROPERTY_SETTINGS
@given(text=st.text(max_size=300))
def test_arbitrary_text_gives_a_spec_or_a_spec_error(tmp_path, text):
    (tmp_path / "img.png").write_bytes(b"")
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    _load_or_spec_error(path)
    is_spec_file(path)


@PROPERTY_SETTINGS
@given(data=documents)
def test_arbitrary_yaml_data_gives_a_spec_or_a_spec_error(tmp_path, data):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    _load_or_spec_error(path)


@PROPERTY_SETTINGS
@given(data=spec_like)
def test_spec_shaped_yaml_gives_a_spec_or_a_spec_error(tmp_path, data):
    (tmp_path / "img.png").write_bytes(b"")
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    _load_or_spec_error(path)


def test_min_auc_is_a_focus_metric_of_its_own(tmp_path):
    focus = one_case(tmp_path, "focus:\n  region: {box: [0, 0, 5, 5]}\n  min_auc: 0.8\n").checks["focus"]
    assert focus.min_auc == 0.8 and focus.min_energy is None  # no default energy floor added
    case = one_case(tmp_path, "focus:\n  min_auc: 0.8\n")
    assert case.error is not None and "needs a region" in case.error.message
    case = one_case(tmp_path, "focus:\n  region: {box: [0, 0, 5, 5]}\n  min_auc: 1.5\n")
    assert case.error is not None and case.error.key_path == "cases[0].focus.min_auc"
