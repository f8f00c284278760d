"""Model loads keep the cyclic garbage collector out of torch's ~400k long-lived objects."""
from __future__ import annotations

import gc

import pytest

from audit.session import _long_lived_allocations


@pytest.fixture()
def thawed():
    gc.unfreeze()
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_collection_is_paused_during_a_load_and_the_survivors_are_frozen(thawed):
    gc.enable()
    with _long_lived_allocations():
        assert not gc.isenabled()
        survivors = [[i] for i in range(5000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(survivors)


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
