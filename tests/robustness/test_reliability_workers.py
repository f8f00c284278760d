"""A pytest-xdist worker killed with SIGKILL ends the run, and the report counts the crashed item.

The worker kills itself (``os.kill(os.getpid(), SIGKILL)`` in a conftest hook) at a chosen item, so the
crash lands at the same place on every run; the old case scheduler (LoadScopeScheduling) hung on this
in 4 of 4 tries. Every run here has a bounded timeout: a hang fails the test instead of the suite.
"""
from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from .conftest import good_cases, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")]

pytest.importorskip("xdist")

TIMEOUT_S = 240

KILLER = """
import os, signal

def pytest_runtest_setup(item):
    # only the first worker that reaches the item dies: the run must then go on without it
    if item.nodeid == {nodeid!r} and not os.path.exists("killed"):
        open("killed", "w").close()
        os.kill(os.getpid(), signal.{signal})
"""


def plain_tests(pytester: pytest.Pytester, n: int = 60) -> None:
    pytester.makepyfile(test_plain=f"""
        import time
        import pytest

        @pytest.mark.parametrize("i", range({n}))
        def test_sleep(i):
            time.sleep(0.02)
    """)


def run_parallel(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", *args, timeout=TIMEOUT_S)


def test_a_killed_worker_ends_a_run_of_plain_tests_with_the_plugin_on(pytester):
    plain_tests(pytester)
    pytester.makeconftest(KILLER.format(nodeid="test_plain.py::test_sleep[20]", signal="SIGKILL"))
    result = run_parallel(pytester)
    assert result.parseoutcomes() == {"failed": 1, "passed": 59}
    result.stdout.fnmatch_lines(["*crashed while running*test_sleep[[]20[]]*"])


def test_a_killed_worker_ends_a_run_with_spec_items_and_the_report_counts_the_crash(pytester, scenes):
    plain_tests(pytester, 20)
    write_spec(pytester, "s.yaml", good_cases(scenes) * 1 + [
        {**c, "id": f"{c['id']}-{i}"} for i in range(3) for c in good_cases(scenes)])
    crashed = "s.yaml::square-01-1::focus"
    pytester.makeconftest(KILLER.format(nodeid=crashed, signal="SIGKILL"))
    result = run_parallel(pytester, "--audit-report", "reports")
    # 8 cases x 2 checks + 20 plain tests; the crashed item is a failure, nothing else is lost
    assert result.parseoutcomes() == {"failed": 1, "passed": 35}
    data = json.loads((pytester.path / "reports" / "results.json").read_text())
    assert data["run"]["counts"] == {"passed": 15, "failed": 1, "skipped": 0, "error": 0}
    case = next(c for c in data["cases"] if c["case_id"] == "square-01-1")
    assert case["outcome"] == "failed"
    (check,) = [c for c in case["checks"] if c["kind"] == "focus"]
    assert check["outcome"] == "failed" and "crashed while running" in check["message"]
    html = (pytester.path / "reports" / "index.html").read_text()
    assert html.count('<article class="card failed"') == 1


def test_case_scheduling_keeps_every_check_of_a_case_on_one_worker(pytester, scenes):
    write_spec(pytester, "s.yaml", [{**c, "id": f"{c['id']}-{i}"} for i in range(6) for c in good_cases(scenes)])
    result = run_parallel(pytester)
    assert result.parseoutcomes() == {"passed": 24}
    # each of the 12 images observed once: a case's two checks never landed on two workers
    result.stdout.fnmatch_lines(["*12 cases*12 images in 12 forward passes*"])


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSEGV"])
def test_a_worker_lost_at_its_first_spec_item_still_ends_the_run(pytester, scenes, how):
    write_spec(pytester, "s.yaml", good_cases(scenes))
    pytester.makeconftest(KILLER.format(nodeid="s.yaml::circle-01::prediction", signal=how))
    result = run_parallel(pytester, "--audit-report", "reports")
    assert result.parseoutcomes() == {"failed": 1, "passed": 3}
    data = json.loads((pytester.path / "reports" / "results.json").read_text())
    assert data["run"]["counts"]["failed"] == 1 and data["run"]["counts"]["passed"] == 3
