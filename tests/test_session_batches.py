"""Which cases share a forward pass (``AuditSession.batch_of``), and the controller's spooled cases."""
from __future__ import annotations

import time
from types import SimpleNamespace

from audit.results import CaseStore, TextSpool
from audit.session import AuditSession, CaseRef


class _Model(SimpleNamespace):
    def key(self) -> tuple:
        return (self.arch,)


def _spec(path: str, arch: str = "shapes_vgg", preprocess: str = "squash", method: str | None = None):
    return SimpleNamespace(path=path, model=_Model(arch=arch, preprocess=preprocess, cam_layer=None,
                                                     cam_method=method))


def _session(refs: list[CaseRef], lookahead: str = "model", batch_size: int = 3) -> AuditSession:
    session = AuditSession(batch_size=batch_size, lookahead=lookahead)
    session.schedule([(ref, 2) for ref in refs])
    return session


def _refs(spec, prefix: str, n: int) -> list[CaseRef]:
    return [CaseRef(f"{prefix}::{i}", spec, None) for i in range(n)]


def test_a_batch_is_the_case_and_the_next_unobserved_cases_of_its_model():
    a, b = _spec("a.yaml"), _spec("b.yaml", arch="other")
    refs = _refs(a, "a", 4) + _refs(b, "b", 2) + _refs(a, "a2", 2)
    session = _session(refs)
    assert session.batch_of("a::0") == ["a::0", "a::1", "a::2"]
    session._observations["a::2"] = object()   # observed already (a case of an earlier batch)
    assert session.batch_of("a::1") == ["a::1", "a::3", "a2::0"]   # skips it and the other model's cases
    assert session.batch_of("b::0") == ["b::0", "b::1"]
    assert session.batch_of("a2::1") == ["a2::1"]   # the last case: nothing after it


def test_file_lookahead_stays_in_the_spec_and_none_looks_nowhere():
    a, a2 = _spec("a.yaml"), _spec("a2.yaml")
    refs = _refs(a, "a", 2) + _refs(a2, "a2", 2)
    assert _session(refs, "file").batch_of("a::0") == ["a::0", "a::1"]
    assert _session(refs, "model", batch_size=8).batch_of("a::1") == ["a::1", "a2::0", "a2::1"]
    assert _session(refs, "none").batch_of("a::0") == ["a::0"]


def test_cases_asking_for_another_explanation_never_join_the_batch():
    refs = (_refs(_spec("a.yaml"), "a", 1) + _refs(_spec("b.yaml", method="scorecam"), "b", 2)
            + _refs(_spec("c.yaml", preprocess="crop"), "c", 1) + _refs(_spec("d.yaml"), "d", 1))
    assert _session(refs, batch_size=8).batch_of("a::0") == ["a::0", "d::0"]


def test_batching_cost_does_not_grow_with_the_queue():
    """Before: every batch filtered the whole queue (quadratic at 10,000 cases). The check is a ratio
    of two timings in one run: the last batches of a 40,000-case queue cost about what those of a
    1,000-case queue cost, where a scan of the queue would make them ~40 times dearer."""
    def per_call(n: int) -> float:
        session = _session(_refs(_spec("a.yaml"), "a", n), batch_size=16)
        ids = [f"a::{i}" for i in range(0, n, 16)][:60]
        start = time.perf_counter()
        for _ in range(20):
            for nodeid in ids:
                session.batch_of(nodeid)
        return time.perf_counter() - start

    per_call(1_000)
    small, large = min(per_call(1_000) for _ in range(3)), min(per_call(40_000) for _ in range(3))
    assert large < 8 * small, (small, large)


def test_the_spool_gives_back_every_text_whatever_the_order_of_writes_and_reads():
    spool = TextSpool()
    texts = ["", "a", "ü€ unicode", "x" * 100_000, '{"nodeid": "s.yaml::c"}']
    handles = []
    for text in texts:
        handles.append(spool.put(text))
        assert spool.get(handles[0]) == texts[0]   # a read between two writes moves nothing
    assert [spool.get(h) for h in reversed(handles)] == texts[::-1]
    spool.close()


def test_a_stored_case_keeps_outcomes_in_memory_and_the_rest_spooled():
    store = CaseStore()
    stored = store.add("s.yaml::c", '{"nodeid": "s.yaml::c", "spec": "s.yaml"}', {"spec": "s.yaml"})
    stored.add_check({"kind": "prediction", "outcome": "passed", "metrics": [{"name": "top1", "value": 1.0}]})
    stored.add_check({"kind": "focus", "outcome": "failed", "metrics": [{"name": "energy_inside",
                                                                          "value": float("nan")}]})
    assert stored.outcomes() == ["passed", "failed"]
    assert [c["kind"] for c in stored.checks("focus")] == ["focus"]
    energy = stored.checks("focus")[0]["metrics"][0]["value"]
    assert energy != energy   # NaN survives the spool
    assert stored.spec == "s.yaml" and len(store) == 1
    store.spool.close()
