"""Smooth weighted round robin: exact proportions per full cycle, and smooth within one."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from test_policies import endpoints, make

from softlb import Endpoint
from softlb.policies import WeightedRoundRobin


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.integers(1, 12), min_size=1, max_size=10), seed=st.integers(0, 1000),
       cycles=st.integers(1, 4))
def test_exact_proportions_over_each_full_cycle(weights: list[int], seed: int, cycles: int) -> None:
    p = make("weighted_round_robin", endpoints(len(weights), weights), seed=seed)
    total = sum(weights)
    for _ in range(cycles):
        counts = Counter(p.pick(None, None, 0.0).id for _ in range(total))
        assert counts == {f"ep{i}": w for i, w in enumerate(weights)}


@settings(max_examples=100, deadline=None)
@given(weights=st.lists(st.integers(0, 6), min_size=1, max_size=8))
def test_zero_weights_drop_out_of_the_cycle(weights: list[int]) -> None:
    p = make("weighted_round_robin", endpoints(len(weights), weights))
    live = {f"ep{i}": w for i, w in enumerate(weights) if w} or {f"ep{i}": 1 for i in range(len(weights))}
    counts = Counter(p.pick(None, None, 0.0).id for _ in range(sum(live.values())))
    assert counts == live


def test_heavy_endpoint_is_interleaved_not_bunched() -> None:
    # nginx's example weights: the heavy peer never runs more than a few picks in a row,
    # and the light ones are not left to the end of the cycle.
    p = make("weighted_round_robin", endpoints(3, [5, 1, 1]))
    seq = [p.pick(None, None, 0.0).id for _ in range(7)]
    assert seq.count("ep0") == 5
    longest = max(len(run) for run in "".join("a" if s == "ep0" else " " for s in seq).split())
    assert longest <= 3
    assert seq[-1] == "ep0" or seq[-2] == "ep0"


def test_every_endpoint_appears_within_its_share_of_the_cycle() -> None:
    # Smoothness bound: an endpoint of weight w appears in every window of ceil(W / w) + 1
    # consecutive picks.
    weights = [7, 3, 2, 1]
    p = make("weighted_round_robin", endpoints(4, weights))
    total = sum(weights)
    seq = [p.pick(None, None, 0.0).id for _ in range(total * 5)]
    for i, w in enumerate(weights):
        window = -(-total // w) + 1
        for start in range(len(seq) - window):
            assert f"ep{i}" in seq[start:start + window]


def test_frequent_updates_do_not_starve_a_low_weight_endpoint():
    # A refresh every 40 picks (health flaps elsewhere, another endpoint's slow-start steps):
    # the weight-1 endpoint must still get its ~1/101 share.
    eps = [Endpoint("big", "127.0.0.1", 1, weight=100), Endpoint("small", "127.0.0.1", 2, weight=1)]
    p = WeightedRoundRobin(rng=random.Random(0))
    picks = Counter()
    for step in range(250):
        p.update(eps, float(step))
        for _ in range(40):
            picks[p.pick(None, None, 0.0).id] += 1
    assert 90 <= picks["small"] <= 110, picks
