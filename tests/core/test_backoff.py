"""Backoff: bounds, growth, cap and reset."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softlb._backoff import Backoff, RetryPolicy

policies = st.builds(
    lambda base, factor: RetryPolicy(base=base, cap=base * factor),
    st.floats(0.001, 10), st.floats(1, 1000),
)


@given(policies, st.integers(1, 10_000), st.integers(0, 2**32))
def test_delay_within_half_and_full_nominal_and_cap(policy, n, seed):
    d = policy.delay(n, random.Random(seed))
    nominal = policy.nominal(n)
    assert nominal / 2 <= d <= nominal <= policy.cap


@given(policies, st.integers(1, 200))
def test_nominal_grows_until_the_cap(policy, n):
    a, b = policy.nominal(n), policy.nominal(n + 1)
    assert b >= a
    assert b == policy.cap or b == pytest.approx(2 * a)


@given(policies)
def test_first_delay_is_base(policy):
    assert policy.nominal(1) == policy.base


def test_backoff_resets_on_success():
    b = Backoff(RetryPolicy(base=1, cap=8), random.Random(1))
    delays = [b.failure() for _ in range(6)]
    assert [b.policy.nominal(i) for i in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert all(0.5 * b.policy.nominal(i + 1) <= d for i, d in enumerate(delays))
    b.success()
    assert b.failures == 0
    assert b.failure() <= 1


def test_requests_in_a_minute_of_failures_are_bounded():
    # The number of retries a dead Consul sees in 60 s, in the worst (shortest) jitter case.
    policy = RetryPolicy()
    elapsed, attempts = 0.0, 0
    while elapsed < 60:
        attempts += 1
        elapsed += policy.nominal(attempts) / 2
    assert attempts <= 8


@pytest.mark.parametrize("base, cap", [(0, 1), (-1, 1), (2, 1)])
def test_invalid_policy(base, cap):
    with pytest.raises(ValueError):
        RetryPolicy(base=base, cap=cap)
