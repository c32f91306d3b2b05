"""Slow start: the ramp function and the tracker of when endpoints became eligible."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softlb._slowstart import REFRESH_STEPS, SlowStart, slow_start_factor
from test_policies import endpoints, make


def test_factor_ramps_linearly_from_the_floor() -> None:
    assert slow_start_factor(0, 30) == 0.1
    assert slow_start_factor(1, 30) == 0.1  # 1/30 is below the floor
    assert slow_start_factor(15, 30) == pytest.approx(0.5)
    assert slow_start_factor(30, 30) == 1.0
    assert slow_start_factor(99, 30) == 1.0
    assert slow_start_factor(5, 0) == 1.0  # no window: no ramp


def test_aggression_bends_the_curve_upward() -> None:
    assert slow_start_factor(7.5, 30, aggression=2.0) == pytest.approx(0.5)  # sqrt(1/4)
    assert slow_start_factor(7.5, 30, aggression=2.0) > slow_start_factor(7.5, 30)


@given(a=st.floats(0, 100), b=st.floats(0, 100), window=st.floats(0.01, 50),
       aggression=st.floats(0.1, 5), floor=st.floats(0.01, 1))
def test_factor_is_monotone_and_bounded(a, b, window, aggression, floor) -> None:
    fa = slow_start_factor(min(a, b), window, aggression, floor)
    fb = slow_start_factor(max(a, b), window, aggression, floor)
    assert floor <= fa <= fb <= 1.0


def test_first_observation_is_warm_newcomers_ramp() -> None:
    ss = SlowStart(30.0)
    eps = endpoints(3, [2, 2, 2])
    ss.observe(["ep0", "ep1"], 100.0)
    assert ss.weights(eps, 100.0) is None and ss.next_refresh(100.0) is None
    ss.observe(["ep0", "ep1", "ep2"], 110.0)
    assert ss.weights(eps, 110.0) == {"ep2": pytest.approx(0.2)}
    assert ss.weights(eps, 125.0) == {"ep2": pytest.approx(1.0)}
    assert ss.next_refresh(125.0) == pytest.approx(125.0 + 30.0 / REFRESH_STEPS)
    assert ss.next_refresh(139.5) == pytest.approx(140.0)  # the ramp's end comes first
    assert ss.weights(eps, 140.0) is None and not ss.ramping(140.0)


def test_returning_endpoint_ramps_again() -> None:
    ss = SlowStart(10.0)
    ss.observe(["ep0", "ep1"], 0.0)
    ss.observe(["ep0"], 5.0)  # ep1 ejected
    ss.observe(["ep0", "ep1"], 8.0)  # and back
    assert ss.ramping(8.0)
    assert ss.weights(endpoints(2), 13.0) == {"ep1": pytest.approx(0.5)}


def test_observing_the_same_set_does_not_restart_ramps() -> None:
    ss = SlowStart(10.0)
    ss.observe(["ep0"], 0.0)
    ss.observe(["ep0", "ep1"], 1.0)
    ss.observe(["ep1", "ep0"], 6.0)
    assert ss.weights(endpoints(2), 6.0) == {"ep1": pytest.approx(0.5)}


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        SlowStart(10.0, min_factor=0)
    with pytest.raises(ValueError):
        SlowStart(10.0, aggression=0)


def test_ramped_weights_shift_traffic_through_a_policy() -> None:
    ss = SlowStart(10.0)
    eps = endpoints(2)
    ss.observe(["ep0"], 0.0)
    ss.observe(["ep0", "ep1"], 1.0)
    p = make("weighted_round_robin", seed=4)
    shares = []
    for t in (1.0, 6.0, 11.0):
        p.update(eps, t, weights=ss.weights(eps, t))
        counts = Counter(p.pick(None, None, t).id for _ in range(1000))
        shares.append(counts["ep1"] / 1000)
    assert shares[0] == pytest.approx(0.1 / 1.1, abs=0.01)
    assert shares[1] == pytest.approx(0.5 / 1.5, abs=0.01)
    assert shares[2] == pytest.approx(0.5, abs=0.01)
