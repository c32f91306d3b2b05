"""The watch planner: configured + on-demand services, idle expiry, the blocking bound, polls."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softlb._watchplan import OnDemandLimitError, WatchPlanner


def planner(**kw):
    kw.setdefault("max_watches", 2)
    kw.setdefault("idle_timeout", 100)
    return WatchPlanner(**kw)


def test_configured_first_then_on_demand_in_first_use_order():
    p = planner()
    ch = p.configure(["a"], 0)
    assert ch.start_blocking == ("a",) and ch.added == ("a",)
    assert p.touch("x", 1).start_blocking == ("x",)
    ch = p.touch("y", 2)
    assert (ch.start_blocking, ch.added) == ((), ("y",))
    assert (p.blocking, p.polled) == (("a", "x"), ("y",))
    assert not p.touch("y", 3)  # already wanted: no change
    # Traffic does not reorder: y stays polled however often it is resolved.
    for t in range(4, 10):
        p.touch("y", t)
    assert p.polled == ("y",)


def test_idle_on_demand_expires_and_promotes():
    p = planner()
    p.configure(["a"], 0)
    p.touch("x", 0)
    p.touch("y", 50)
    assert p.next_expiry() == 100
    ch = p.expire(100)
    assert (ch.removed, ch.stop_blocking, ch.start_blocking) == (("x",), ("x",), ("y",))
    assert (p.blocking, p.polled) == (("a", "y"), ())
    assert not p.expire(149)
    assert p.expire(150).removed == ("y",)
    assert p.next_expiry() is None
    assert p.blocking == ("a",)  # configured never expire


def test_touch_restarts_idle_clock():
    p = planner()
    p.touch("x", 0)
    p.touch("x", 90)
    assert not p.expire(100)
    assert p.expire(190).removed == ("x",)


def test_reconfigure_demotes_dropped_services_to_on_demand():
    p = planner()
    p.configure(["a", "b"], 0)
    ch = p.configure(["c"], 10)
    assert ch.added == ("c",) and not ch.removed
    assert p.blocking == ("c", "a")
    assert p.expire(110).removed == ("a", "b")


def test_poll_round_robin_spacing_and_rate_cap():
    p = planner(max_watches=0, poll_period=30, max_poll_rate=10)
    for i, s in enumerate("abc"):
        p.touch(s, 0)
    assert p.poll_spacing == 10
    got = []
    now = 0.0
    while len(got) < 6:
        s = p.poll_due(now)
        if s:
            got.append(s)
        now = p.next_poll_at
    assert got == list("abcabc")
    assert p.poll_due(now - 0.001) is None
    many = planner(max_watches=0, poll_period=30, max_poll_rate=10)
    for i in range(1000):
        many.touch(f"s{i}", 0)
    assert many.poll_spacing == pytest.approx(0.1)  # rate cap, period stretches to 100 s


def test_poll_cursor_survives_membership_change():
    p = planner(max_watches=0)
    for s in "abc":
        p.touch(s, 0)
    assert p.poll_due(0) == "a"
    p.touch("d", 1)
    assert p.poll_due(100) == "b"


@given(st.lists(st.tuples(st.sampled_from(["touch", "expire", "configure"]),
                          st.sampled_from("abcdefg"), st.floats(0, 10)), max_size=40),
       st.integers(0, 4))
def test_invariants(ops, max_watches):
    p = planner(max_watches=max_watches, idle_timeout=5)
    now = 0.0
    for op, name, dt in ops:
        now += dt
        if op == "touch":
            p.touch(name, now)
        elif op == "expire":
            p.expire(now)
        else:
            p.configure([name], now)
        assert len(p.blocking) <= max_watches
        assert not set(p.blocking) & set(p.polled)
        assert len(set(p.wanted)) == len(p.wanted)
        assert all(p.is_wanted(s) for s in p.wanted)
        if p.polled:
            assert len(p.blocking) == max_watches


def test_touch_never_moves_the_idle_clock_back():
    p = planner()
    p.touch("x", 50)
    p.touch("x", 10)  # an older use reported late
    assert p.on_demand == ("x",)
    assert p.next_expiry() == 150


def test_max_on_demand_refuses_new_names_only():
    p = planner(max_on_demand=2)
    p.configure(["a"], 0)
    p.touch("x", 0)
    p.touch("y", 0)
    with pytest.raises(OnDemandLimitError, match="max_on_demand"):
        p.touch("z", 1)
    assert p.wanted == ("a", "x", "y") and not p.is_wanted("z")
    assert not p.touch("x", 2) and not p.touch("a", 2)  # known names are still fine
    assert p.expire(100).removed == ("y",)  # idle services free their places
    assert p.touch("z", 101).added == ("z",)
    with pytest.raises(OnDemandLimitError):
        p.touch("w", 101)


class CountingName(str):
    """A service name that counts equality comparisons made against it."""

    compares = 0
    __hash__ = str.__hash__

    def __eq__(self, other):
        CountingName.compares += 1
        return str.__eq__(self, other)


def test_planning_does_not_scan_inside_scans():
    # A client resolving n made-up names used to cost O(n^2) comparisons per touch (tuple
    # membership tests in _replan), O(n^3) in all: 2000 names froze the agent for 20 s. With
    # set lookups names are hashed, not compared, so the count stays near zero.
    n = 150
    CountingName.compares = 0
    p = planner(max_watches=10, idle_timeout=5)
    p.configure([CountingName(f"c{i}") for i in range(20)], 0)
    for i in range(n):
        p.touch(CountingName(f"typo-{i}"), i / n)
    p.configure([CountingName(f"c{i}") for i in range(0, 20, 2)], 1)
    p.expire(5.5)
    p.expire(10)
    assert len(p.wanted) == 10
    assert CountingName.compares <= 10 * n
