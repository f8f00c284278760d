"""A large plain spec is not an alias bomb: only what aliases add is counted, and loading is fast.

An 8,000-case spec without a single alias used to be refused ("the document expands to more than
100000 values"): every value was counted. Now the values the author wrote are free; aliases may add
``MAX_NODES`` values, or ``ALIAS_RATIO`` times what the document holds, so a ``<<: *defaults`` in
every case of a long spec loads and a billion-laughs document is still refused at once.
"""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import yaml

from audit import spec as S
from audit.errors import SpecError
from audit.spec import validation, yaml_positions

MODEL = "model: {arch: shapes_vgg}\n"


def big_spec(folder: Path, n: int, merge: bool = False) -> Path:
    (folder / "img.png").write_bytes(b"")
    head = MODEL
    if merge:
        head += "defaults: &d {top_k: 3, marks: [a, b, c, d, e, f, g]}\n"
    lines = [head + "cases:"]
    for i in range(n):
        extra = ", <<: *d" if merge else ""
        lines.append(f"  - {{id: c{i}, image: img.png, expect: {{top1: circle}}{extra}}}")
    path = folder / "big.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_an_8000_case_spec_without_aliases_loads(tmp_path):
    spec = S.load_spec(big_spec(tmp_path, 8000))
    assert len(spec.cases) == 8000 and not spec.case_errors
    assert spec.cases[7692].id == "c7692"


@pytest.mark.slow
def test_a_merge_in_every_case_of_a_long_spec_loads(tmp_path):
    # 12,000 merges of 9 values: more than MAX_NODES added, but far less than 10x what is written
    spec = S.load_spec(big_spec(tmp_path, 12_000, merge=True))
    assert len(spec.cases) == 12_000 and spec.cases[-1].top_k == 3 and not spec.case_errors


def test_what_the_document_holds_is_not_counted_but_what_aliases_add_is(tmp_path, monkeypatch):
    monkeypatch.setattr(yaml_positions, "MAX_NODES", 50)
    monkeypatch.setattr(yaml_positions, "ALIAS_RATIO", 1)
    (tmp_path / "img.png").write_bytes(b"")
    plain = tmp_path / "plain.yaml"
    plain.write_text(MODEL + "cases:\n" + "".join(f"  - {{id: c{i}, image: img.png}}\n" for i in range(40)))
    assert len(S.load_spec(plain).cases) == 40           # ~160 values written, none added
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(MODEL + "x: &x [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
                    "cases:\n" + "".join(f"  - {{id: c{i}, image: img.png, marks: *x}}\n" for i in range(8)))
    with pytest.raises(SpecError, match=r"expands to more than \d+ values through aliases"):
        S.load_spec(bomb)                                 # 8 x 11 values added to ~50 written


def test_billion_laughs_inside_a_long_spec_is_still_refused(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    cases = "".join(f"  - {{id: c{i}, image: img.png}}\n" for i in range(2000))
    path = tmp_path / "bomb.yaml"
    path.write_text(MODEL + "\n".join(lines) + "\ncases:\n" + cases + "  - {id: z, image: img.png, marks: *l9}\n")
    with pytest.raises(SpecError, match="expands to more than"):
        S.load_spec(path)


@pytest.mark.parametrize("enabled", [True, False])
def test_loading_leaves_the_garbage_collector_as_it_was(tmp_path, enabled):
    path = big_spec(tmp_path, 3)
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        S.load_spec(path)
        assert gc.isenabled() is enabled
        with pytest.raises(SpecError):
            S.load_spec(tmp_path / "missing.yaml")
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def test_the_inlined_schema_validates_like_the_original(tmp_path):
    import json

    from jsonschema import Draft202012Validator

    composed = S.schema()
    original, inlined = Draft202012Validator(composed), validation._validator(validation._registry(None))

    samples = [
        {"model": {"arch": "x"}, "cases": [{"id": "a", "image": "i.png", "expect": {"top1": "circle"}}]},
        {"model": {"arch": "x"}, "cases": [{"id": "a", "image": "i.png", "focus": {"region": {"boxx": [1]}}}]},
        {"model": {"arch": "x"}, "cases": [{"id": 3, "image": "i.png", "expect": {"top1": [1]}, "top_k": 0}]},
        {"model": {"arch": "x"}, "cases": [{"image": "i.png", "focus": {"region": [{"box": [0, 0, 1]}]}}],
         "defaults": {"marks": [1]}},
    ]
    for data in samples:
        def key(errors):
            return sorted((list(e.absolute_path), e.validator, e.message) for e in errors)
        assert key(inlined.iter_errors(data)) == key(original.iter_errors(data))
    assert "$ref" not in json.dumps(inlined.schema.get("properties", {}))


def test_a_generated_50000_case_spec_fits_the_size_limit():
    one_case = yaml.safe_dump([{"id": "case-49999", "image": "images/scene-49999.png",
                                "expect": {"top1": "circle", "min_prob": 0.5},
                                "focus": {"region": {"box": [12, 20, 40, 48]}, "min_energy": 0.3}}])
    assert 50_000 * len(one_case) < yaml_positions.MAX_BYTES
