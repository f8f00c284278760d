"""Command-line argument errors exit 2 with one line, before any model loads.

``explain --out <a file>`` and an unwritable ``--out`` used to end in a traceback after the model ran;
``compare --out <a file>`` ran both models first; ``--batch-size 0`` and ``--audit-batch-size -1``
silently meant 1. Each is refused up front now: the tests make loading a model fail loudly, so a
refusal that came after a load would show as that failure instead.
"""
from __future__ import annotations

import os
import shutil

import pytest

import audit
from audit import cli

from .conftest import SHAPES, write_spec

IMAGE = str(SHAPES / "circle-01.png")


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(audit, "load_model", refuse)


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_explain_out_naming_an_existing_file_exits_2_before_the_model_loads(tmp_path, capsys, no_model_loads):
    target = tmp_path / "taken.txt"
    target.write_text("not a folder")
    assert cli.main(["explain", IMAGE, "--model", "shapes_vgg", "--out", str(target)]) == 2
    assert "--out" in (line := one_line_error(capsys)) and "is a file, not a folder" in line
    assert target.read_text() == "not a folder"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_explain_out_in_an_unwritable_place_exits_2_before_the_model_loads(tmp_path, capsys, no_model_loads):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert cli.main(["explain", IMAGE, "--model", "shapes_vgg", "--out", str(locked / "out")]) == 2
    assert "not writable" in one_line_error(capsys)


def test_explain_out_below_a_file_exits_2_before_the_model_loads(tmp_path, capsys, no_model_loads):
    (tmp_path / "afile").write_text("x")
    assert cli.main(["explain", IMAGE, "--model", "shapes_vgg", "--out", str(tmp_path / "afile" / "out")]) == 2
    assert "not writable" in one_line_error(capsys)


def test_compare_out_naming_a_file_exits_2_before_either_model_runs(tmp_path, capsys, no_model_loads):
    (tmp_path / "images").mkdir()
    shutil.copy(IMAGE, tmp_path / "images" / "circle-01.png")
    spec = tmp_path / "s.yaml"
    spec.write_text("model: {arch: shapes_vgg}\ncases:\n  - {id: c, image: images/circle-01.png}\n")
    target = tmp_path / "compare.html"
    target.write_text("x")
    code = cli.main(["compare", str(spec), "--a", "shapes_vgg", "--b", "shapes_vgg_shortcut", "--out", str(target)])
    assert code == 2
    assert "is a file, not a folder" in one_line_error(capsys)


@pytest.mark.parametrize("command", [["explain", IMAGE], ["snapshot", IMAGE]])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_batch_size_below_one_is_an_argument_error(capsys, no_model_loads, command, value):
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--model", "shapes_vgg", "--batch-size", value])
    assert info.value.code == 2
    assert f"--batch-size: must be >= 1, got {int(value)}" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_an_audit_batch_size_below_one_is_a_usage_error_before_any_model_loads(pytester, value):
    write_spec(pytester, "s.yaml", [{"id": "c", "image": "missing.png"}])
    result = pytester.runpytest("--audit-batch-size", value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"--audit-batch-size must be at least 1, got {int(value)}" in result.stderr.str()
    assert "Traceback" not in result.stderr.str() and "model loads" not in result.stdout.str()
