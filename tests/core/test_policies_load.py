"""Load-aware policies: least_connections, sed, nq (open leases) and least_request
(peak-EWMA latency from reports plus open leases)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_policies import endpoints, make

LEASE_BASED = ["least_connections", "sed", "nq"]


@pytest.mark.parametrize("name", LEASE_BASED)
def test_busy_endpoints_are_avoided_and_freed_ones_return(name: str) -> None:
    p = make(name, endpoints(3))
    for _ in range(3):
        p.on_start("ep0", 0.0)
    p.on_start("ep1", 0.0)
    assert {p.pick(None, None, 0.0).id for _ in range(50)} == {"ep2"}
    p.on_start("ep2", 0.0)
    p.on_start("ep2", 0.0)
    assert {p.pick(None, None, 0.0).id for _ in range(50)} == {"ep1"}
    for _ in range(3):
        p.on_finish("ep0", True, None, 0.0)
    assert {p.pick(None, None, 0.0).id for _ in range(50)} == {"ep0"}


@pytest.mark.parametrize("name", LEASE_BASED)
@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=80),
       weights=st.lists(st.integers(1, 4), min_size=6, max_size=6))
def test_pick_is_the_lowest_score(name: str, ops: list, weights: list[int]) -> None:
    # Against a brute-force model: the heap must always surface a minimum-score endpoint.
    p = make(name, endpoints(6, weights))
    active = Counter()
    for start, i in ops:
        eid = f"ep{i}"
        if start:
            p.on_start(eid, 0.0)
            active[eid] += 1
        else:
            p.on_finish(eid, True, None, 0.0)
            active[eid] = max(0, active[eid] - 1)
        got = p.pick(None, None, 0.0)
        scores = {f"ep{j}": type(p).score(active[f"ep{j}"], w) for j, w in enumerate(weights)}
        assert scores[got.id] == min(scores.values())


def test_weights_scale_the_connection_budget() -> None:
    # Weighted least connections fills in proportion: 3x the weight, 3x the open leases.
    p = make("least_connections", endpoints(2, [1, 3]))
    for _ in range(400):
        p.on_start(p.pick(None, None, 0.0).id, 0.0)
    assert p.load.active == {"ep0": 100, "ep1": 300}


def test_sed_and_nq_differ_from_least_connections_as_ipvs_documents() -> None:
    # One lease on the heavy endpoint (weight 10), none on the light one (weight 1).
    def choice(name: str) -> str:
        p = make(name, endpoints(2, [1, 10]))
        p.on_start("ep1", 0.0)
        return p.pick(None, None, 0.0).id

    assert choice("least_connections") == "ep0"  # 0/1 < 1/10
    assert choice("sed") == "ep1"  # (1+1)/10 < (0+1)/1
    assert choice("nq") == "ep0"  # the idle endpoint first


def test_idle_ties_are_shared_not_stuck() -> None:
    p = make("least_connections", endpoints(4), seed=9)
    counts = Counter(p.pick(None, None, 0.0).id for _ in range(4000))
    assert set(counts) == {"ep0", "ep1", "ep2", "ep3"}
    assert min(counts.values()) > 850


def test_finish_without_start_does_not_go_negative() -> None:
    p = make("least_connections", endpoints(2))
    p.on_finish("ep0", True, None, 0.0)  # a lease opened before a policy switch
    p.on_start("ep1", 0.0)
    assert p.load.active == {"ep1": 1}
    assert p.pick(None, None, 0.0).id == "ep0"


def test_leases_survive_an_update() -> None:
    p = make("least_connections", endpoints(3))
    p.on_start("ep0", 0.0)
    p.on_start("ep0", 0.0)
    p.on_start("ep1", 0.0)
    p.update(endpoints(3)[:2], 1.0)  # ep2 leaves
    assert p.pick(None, None, 1.0).id == "ep1"
    p.update(endpoints(3), 2.0)
    assert p.pick(None, None, 2.0).id == "ep2"


def test_heap_stays_compact_under_many_lease_events() -> None:
    p = make("sed", endpoints(5))
    for i in range(10_000):
        p.on_start(f"ep{i % 5}", 0.0)
        p.on_finish(f"ep{(i + 2) % 5}", True, None, 0.0)
    assert len(p._heap) <= 3 * 5 + 16 + 1


# --------------------------------------------------------------------- least_request


def _report(p, eid: str, latency: float, now: float) -> None:
    p.on_start(eid, now)
    p.on_finish(eid, True, latency, now)


def test_least_request_prefers_the_fast_endpoint() -> None:
    p = make("least_request", endpoints(5), seed=1)
    for t in range(20):
        for i in range(5):
            _report(p, f"ep{i}", 1.0 if i == 0 else 0.01, t * 0.1)
    counts = Counter(p.pick(None, None, 2.0).id for _ in range(5000))
    # ep0 is only chosen when both random draws land on it, which distinct draws avoid.
    assert counts["ep0"] < 50
    assert min(counts[f"ep{i}"] for i in range(1, 5)) > 1000


def test_least_request_peak_reacts_at_once_and_recovers_slowly() -> None:
    p = make("least_request", endpoints(2), seed=1, decay=10.0)
    for t in range(10):
        _report(p, "ep0", 0.01, t)
        _report(p, "ep1", 0.02, t)
    assert p.pick(None, None, 10.0).id == "ep0"
    _report(p, "ep0", 0.5, 10.0)  # one slow answer: avoided immediately
    assert p.pick(None, None, 10.0).id == "ep1"
    # No further news from ep0: its estimate decays toward zero, so it is tried again.
    for t in range(11, 60):
        _report(p, "ep1", 0.02, t)
    assert p.pick(None, None, 60.0).id == "ep0"


def test_least_request_counts_open_requests() -> None:
    p = make("least_request", endpoints(2), seed=1)
    _report(p, "ep0", 0.01, 0.0)
    _report(p, "ep1", 0.03, 0.0)
    for _ in range(3):
        p.on_start("ep0", 0.0)  # 0.01 * 4 > 0.03 * 1
    assert p.pick(None, None, 0.0).id == "ep1"


def test_least_request_treats_a_newcomer_as_average() -> None:
    p = make("least_request", endpoints(3), seed=1)
    for t in range(10):
        _report(p, "ep0", 0.1, t)
        _report(p, "ep1", 0.3, t)
    p.update(endpoints(4), 10.0)
    counts = Counter(p.pick(None, None, 10.0).id for _ in range(3000))
    # The newcomer (ep3) beats the slow ep1 but not the fast ep0.
    assert counts["ep0"] > counts["ep3"] > counts["ep1"]
