"""The report folder under stress: two runs at once, a full disk, temp files of killed runs.

Two runs writing one folder used to delete each other's pictures (a ``FileNotFoundError`` traceback,
or a page with 245 missing pictures); a full disk ended in an ``OSError`` traceback and left orphaned
pictures that kept the disk full. Now each run's asset folder is locked while it runs, commits are
serialised, a run that cannot commit removes its pictures and says so in one line, and the previous
report stays whole.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audit import report as R
from audit.report import folder as report_folder

from .conftest import REPO, assert_no_traceback, check_report, good_cases, write_spec


def run_dict() -> dict:
    return {"started": "2026-01-01T00:00:00", "duration_s": 1.0, "models": [], "versions": {},
            "counts": {"passed": 0, "failed": 0, "skipped": 0, "error": 0}, "args": [], "device": "cpu",
            "stats": {}}


def runs_in(out: Path) -> list[str]:
    assets = out / "assets"
    return sorted(p.name for p in assets.iterdir()) if assets.is_dir() else []


def test_committing_a_page_never_prunes_the_pictures_of_a_run_still_going(tmp_path):
    out = tmp_path / "reports"
    first, first_dir = R.new_run_dir(out)
    second, second_dir = R.new_run_dir(out)
    (second_dir / "picture.jpg").write_bytes(b"still being drawn")
    R.write_report(out, run_dict(), [], first)
    assert runs_in(out) == sorted([first, second])   # the second run is alive: its folder stays
    R.write_report(out, run_dict(), [], second)
    assert runs_in(out) == [second]                   # the first committed and let go: pruned


def test_an_asset_folder_of_a_killed_run_is_pruned(tmp_path):
    out = tmp_path / "reports"
    orphan = out / "assets" / "20260101-000000-abcdef"
    orphan.mkdir(parents=True)
    run_id, _ = R.new_run_dir(out)
    R.write_report(out, run_dict(), [], run_id)
    assert runs_in(out) == [run_id]


def test_a_failed_commit_removes_the_runs_pictures_and_keeps_the_old_report(tmp_path, monkeypatch):
    out = tmp_path / "reports"
    old_id, _ = R.new_run_dir(out)
    R.write_report(out, run_dict(), [], old_id)
    page = (out / "index.html").read_bytes()
    run_id, run_dir = R.new_run_dir(out)
    (run_dir / "x.jpg").write_bytes(b"jpeg")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_folder, "_write_temp", full)   # the commit stages files with it
    with pytest.raises(OSError):
        R.write_report(out, run_dict(), [], run_id)
    assert (out / "index.html").read_bytes() == page and runs_in(out) == [old_id]
    assert sorted(p.name for p in out.iterdir()) == ["assets", "index.html", "results.json"]


def test_stale_temps_of_killed_runs_are_removed_at_the_next_commit_and_fresh_ones_kept(tmp_path):
    out = tmp_path / "reports"
    out.mkdir()
    stale = [out / ".index-0123456789ab.tmp", out / ".results-0123456789ab.tmp", out / ".write-test-abc"]
    fresh = out / ".index-ba9876543210.tmp"   # another run's, being written right now
    old = time.time() - 3600
    for path in [*stale, fresh]:
        path.write_text("half a page")
    for path in stale:
        os.utime(path, (old, old))
    unrelated = out / ".notes.tmp"
    unrelated.write_text("the user's")
    os.utime(unrelated, (old, old))
    run_id, _ = R.new_run_dir(out)
    R.write_report(out, run_dict(), [], run_id)
    assert not any(p.exists() for p in stale) and fresh.exists() and unrelated.exists()


@pytest.mark.slow
def test_two_concurrent_report_runs_both_end_with_a_whole_page(pytester, scenes):
    # the short run commits (and prunes) while the long one is still drawing its pictures
    short = [{**c, "id": f"{c['id']}-short"} for c in good_cases(scenes)]
    long = [{**c, "id": f"{c['id']}-{i}"} for i in range(12) for c in good_cases(scenes)]
    write_spec(pytester, "short.yaml", short)
    write_spec(pytester, "long.yaml", long)
    pytester.makeconftest("""
        import time

        def pytest_runtest_teardown(item):
            if item.nodeid.startswith("long.yaml"):
                time.sleep(0.1)   # the long run keeps drawing well after the short one committed
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = [subprocess.Popen([sys.executable, "-m", "pytest", spec, "-p", "no:cacheprovider", "--audit-report",
                              "reports"], cwd=pytester.path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for spec in ("long.yaml", "short.yaml")]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    for run, output, passed in zip(runs, outputs, (48, 4)):
        assert run.returncode == 0, output[-3000:]
        assert "Traceback" not in output and "could not be written" not in output, output[-3000:]
        assert f"{passed} passed" in output
    report = check_report(pytester, [c["id"] for c in long])   # the last page; every picture it links exists
    assert len(runs_in(pytester.path / "reports")) == 1
    assert all(c["assets"].get("overlay") for c in report.data["cases"])


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_gives_one_line_keeps_the_old_report_and_removes_the_orphans(pytester, scenes, small_disk):
    write_spec(pytester, "s.yaml", good_cases(scenes))
    out = small_disk / "reports"
    pytester.runpytest("-p", "no:cacheprovider", "--audit-report", str(out)).assert_outcomes(passed=4)
    page, results = (out / "index.html").read_bytes(), (out / "results.json").read_bytes()
    (old_run,) = runs_in(out)
    filler = fill(small_disk)
    result = pytester.runpytest("-p", "no:cacheprovider", "--audit-report", str(out))
    result.assert_outcomes(passed=4)
    assert_no_traceback(result)
    lines = [line for line in result.outlines if "report could not be written" in line]
    assert len(lines) == 1 and "No space left on device" in lines[0], result.stdout.str()[-2000:]
    assert "previous report was left in place and this run exits non-zero" in lines[0]
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR   # every test passed, but the gate's file is stale
    assert (out / "index.html").read_bytes() == page and (out / "results.json").read_bytes() == results
    assert runs_in(out) == [old_run]   # the new run's pictures are gone, the old page's are whole
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    filler.unlink()
    pytester.runpytest("-p", "no:cacheprovider", "--audit-report", str(out)).assert_outcomes(passed=4)
    assert len(runs_in(out)) == 1 and json.loads((out / "results.json").read_text())["run"]["counts"]["passed"] == 4
