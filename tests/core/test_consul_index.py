"""Blocking-query index rules and the empty-set guard."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softlb import Endpoint
from softlb._consul import ConsulDataError, EmptySetGuard, index_changed, next_index, parse_index

U64 = (1 << 64) - 1


@pytest.mark.parametrize("header", [None, "", "0", " 0 "])
def test_missing_or_zero_index_becomes_one(header):
    assert next_index(17, header) == 1
    assert next_index(0, header) == 1


@given(st.integers(0, U64), st.integers(1, U64))
def test_index_rules(old, new):
    got = next_index(old, str(new))
    if new < old:
        assert got == 0
    else:
        assert got == new
    assert got != 0 or new < old  # 0 is only ever a deliberate reset


@given(st.integers(1, U64))
def test_same_index_is_no_change(i):
    assert next_index(i, str(i)) == i
    assert not index_changed(i, next_index(i, str(i)))


@pytest.mark.parametrize("header", ["abc", "-1", "1.5", str(U64 + 1), "0x10"])
def test_unparsable_index_is_an_error(header):
    with pytest.raises(ConsulDataError, match="X-Consul-Index"):
        next_index(3, header)


def test_parse_index_absent():
    assert parse_index(None) is None


def ep(i: str) -> Endpoint:
    return Endpoint(id=i, address="10.0.0.1", port=1)


def test_guard_holds_then_accepts_empty():
    g = EmptySetGuard(hold=30)
    assert g.decide([ep("a")], 0).endpoints == (ep("a"),)
    d = g.decide([], 10)
    assert (d.endpoints, d.holding, d.hold_until) == ((ep("a"),), True, 40)
    assert g.decide([], 39.9).holding
    d = g.decide([], 40)
    assert (d.endpoints, d.holding) == ((), False)
    # Once accepted, a later empty answer is just empty.
    assert not g.decide([], 100).holding


def test_guard_ends_hold_on_nonempty_answer():
    g = EmptySetGuard(hold=30)
    g.decide([ep("a")], 0)
    g.decide([], 1)
    d = g.decide([ep("b")], 2)
    assert (d.endpoints, d.holding) == ((ep("b"),), False)
    # A new empty run starts a fresh hold.
    assert g.decide([], 50).hold_until == 80


def test_guard_disabled_and_initially_empty():
    off = EmptySetGuard(hold=0)
    off.decide([ep("a")], 0)
    assert off.decide([], 1).endpoints == ()
    fresh = EmptySetGuard(hold=30)
    assert fresh.decide([], 0) == fresh.decide([], 1)
    assert not fresh.decide([], 2).holding


def test_guard_seeded_from_snapshot():
    g = EmptySetGuard(hold=5)
    g.seed([ep("a")])
    assert g.decide([], 0).holding
