"""Session resources: the garbage collector kept out of model loads, torch threads shared under xdist."""
from __future__ import annotations

import gc
import os

import pytest

from audit.session import _long_lived_allocations, share_cores_between_workers


@pytest.fixture()
def thawed():
    gc.unfreeze()
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_collection_is_paused_during_a_load_and_nothing_is_frozen(thawed):
    gc.enable()
    before = gc.get_freeze_count()
    with _long_lived_allocations():
        assert not gc.isenabled()
        survivors = [[i] for i in range(5000)]
    assert gc.isenabled() and survivors
    assert gc.get_freeze_count() == before


def test_an_in_process_run_leaves_the_users_garbage_collector_as_it_was(tmp_path):
    """model-audit used to gc.freeze() after a model load and never undo it (issue 12)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = (
        "import gc, pytest\n"
        "frozen = gc.get_freeze_count(); enabled = gc.isenabled(); threshold = gc.get_threshold()\n"
        f"code = pytest.main([{str(repo / 'specs' / 'shapes')!r}, '-q', '-p', 'no:cacheprovider'])\n"
        "assert code == 0, code\n"
        "assert gc.get_freeze_count() == frozen, (gc.get_freeze_count(), frozen)\n"
        "assert gc.isenabled() == enabled and gc.get_threshold() == threshold\n"
        "print('GC-UNCHANGED')\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "GC-UNCHANGED" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_a_load_that_fails_still_restores_the_collector(thawed):
    gc.enable()
    with pytest.raises(RuntimeError), _long_lived_allocations():
        raise RuntimeError("bad checkpoint")
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled(thawed):
    gc.disable()
    with _long_lived_allocations():
        pass
    assert not gc.isenabled()


# ---------------------------------------------------------------------------------------------
# threads under pytest-xdist


@pytest.fixture()
def torch_threads():
    import torch

    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def test_each_xdist_worker_gets_its_share_of_the_cores(torch_threads):
    assert share_cores_between_workers({"PYTEST_XDIST_WORKER_COUNT": "2"}) == max(1, _cores() // 2)
    assert torch_threads.get_num_threads() == max(1, _cores() // 2)
    assert share_cores_between_workers({"PYTEST_XDIST_WORKER_COUNT": str(4 * _cores())}) == 1


@pytest.mark.parametrize("environ", [{}, {"PYTEST_XDIST_WORKER_COUNT": "1"},
                                     {"PYTEST_XDIST_WORKER_COUNT": "2", "OMP_NUM_THREADS": "3"},
                                     {"PYTEST_XDIST_WORKER_COUNT": "2", "MKL_NUM_THREADS": "3"}])
def test_serial_runs_and_a_users_thread_setting_are_left_alone(torch_threads, environ):
    torch_threads.set_num_threads(1)
    assert share_cores_between_workers(environ) is None
    assert torch_threads.get_num_threads() == 1
