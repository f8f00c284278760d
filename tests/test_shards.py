"""Shards: a partition of the cases that every CI job computes alone, and the merge of their results."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from audit.errors import AuditError
from audit.merge import copy_assets, load_results, merge_docs, verdict
from audit.shards import Shard, parse_shard, shard_of

IDS = [f"img-{i:05d}" for i in range(3000)]


def test_every_case_is_in_exactly_one_shard_and_shards_are_balanced():
    shards = [Shard(k, 3) for k in (1, 2, 3)]
    held = [[i for i in IDS if s.holds("specs/set.yaml", i)] for s in shards]
    assert sorted(sum(held, [])) == IDS
    assert all(900 <= len(h) <= 1100 for h in held), [len(h) for h in held]


def test_a_case_keeps_its_shard_when_the_set_changes_and_paths_are_posix():
    before = {i: shard_of("specs/set.yaml", i, 4) for i in IDS[:100]}
    assert before == {i: shard_of("specs/set.yaml", i, 4) for i in IDS[:100]}
    assert shard_of(Path("specs") / "set.yaml", "img-00001", 4) == before["img-00001"]
    assert len({shard_of(f"specs/{n}.yaml", "same-id", 1000) for n in range(50)}) > 40  # the spec counts


@pytest.mark.parametrize("text, expected", [("1/1", Shard(1, 1)), ("2/3", Shard(2, 3)), (" 3 / 3 ", Shard(3, 3))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected and str(expected) == f"{expected.index}/{expected.count}"


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "2", "a/b", "-1/3"])
def test_bad_shard_is_a_one_line_error(text):
    with pytest.raises(ValueError, match=r"--audit-shard"):
        parse_shard(text)


def _doc(path: str, cases: list[dict], counts: dict) -> dict:
    return {"_path": path, "run": {"started": "2026-01-01T00:00:0" + path[-1], "duration_s": 3.0,
                                   "counts": counts, "models": [{"arch": "m"}], "stats": {"images": len(cases)}},
            "cases": cases}


def _case(nodeid: str, outcome: str) -> dict:
    return {"nodeid": nodeid, "case_id": nodeid, "checks": [{"kind": "prediction", "outcome": outcome}]}


def test_merge_recounts_and_refuses_overlapping_shards():
    a = _doc("a/results.json1", [_case("s::x", "passed"), _case("s::y", "failed")], {})
    b = _doc("b/results.json2", [_case("s::z", "passed"), {"nodeid": "s::gates", "scope": "spec"}], {})
    run, cases = merge_docs([a, b])
    assert [c["nodeid"] for c in cases] == ["s::x", "s::y", "s::z"]
    assert run["counts"] == {"passed": 2, "failed": 1, "skipped": 0, "error": 0}
    assert run["stats"] == {"images": 4} and run["models"] == [{"arch": "m"}]
    assert run["started"].endswith("01") and verdict(run) == 1
    with pytest.raises(AuditError, match=r"case s::x is also in a/results.json1: the shards overlap"):
        merge_docs([a, _doc("c/results.json3", [_case("s::x", "passed")], {})])


def test_merge_rebuilds_spec_scope_records_from_all_cases():
    a = _doc("a/r1", [_case("s::x", "passed")], {})
    b = _doc("b/r2", [_case("s::y", "passed")], {})
    seen = []

    def regate(cases):
        seen.extend(c["nodeid"] for c in cases)
        return [{"nodeid": "s::gates", "scope": "spec", "checks": [{"kind": "gates", "outcome": "failed"}]}]

    run, cases = merge_docs([a, b], regate)
    assert seen == ["s::x", "s::y"] and cases[-1]["outcome"] == "failed" and verdict(run) == 1


def test_copy_assets_moves_pictures_into_the_merged_run(tmp_path):
    shard = tmp_path / "shard"
    (shard / "assets" / "r1").mkdir(parents=True)
    (shard / "assets" / "r1" / "x-overlay.jpg").write_bytes(b"jpg")
    (tmp_path / "out" / "assets" / "new").mkdir(parents=True)
    case = {"nodeid": "x", "assets": {"overlay": "assets/r1/x-overlay.jpg", "grids": {"l": "assets/r1/x-overlay.jpg"},
                                      "sizes": {"assets/r1/x-overlay.jpg": [4, 4]}}}
    moved = copy_assets(case, shard, tmp_path / "out", "new")
    assert moved["assets"]["overlay"] == "assets/new/x-overlay.jpg"
    assert moved["assets"]["grids"] == {"l": "assets/new/x-overlay.jpg"}
    assert moved["assets"]["sizes"] == {"assets/new/x-overlay.jpg": [4, 4]}
    assert (tmp_path / "out" / "assets" / "new" / "x-overlay.jpg").read_bytes() == b"jpg"
    assert case["assets"]["overlay"] == "assets/r1/x-overlay.jpg"  # input untouched


def test_load_results_errors_are_one_line(tmp_path):
    with pytest.raises(AuditError, match=r"no results.json"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"cases": 3}))
    with pytest.raises(AuditError, match=r"not a results.json written by model-audit"):
        load_results(tmp_path)
