"""Properties every policy must keep, whatever it is; also the builders the other
policy test modules import (tests/core is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softlb import ConfigError, Endpoint
from softlb.policies import POLICIES, Policy, effective_weights


def endpoints(n: int, weights: list[int] | None = None, prefix: str = "ep") -> list[Endpoint]:
    ws = weights if weights is not None else [1] * n
    return [
        Endpoint(id=f"{prefix}{i}", address=f"10.0.{i // 250}.{i % 250 + 1}", port=8000 + i, weight=w)
        for i, w in enumerate(ws)
    ]


def make(name: str, eps: list[Endpoint] | None = None, seed: int = 0, **options: object) -> Policy:
    policy = POLICIES[name](rng=random.Random(seed), options=options)
    if eps is not None:
        policy.update(eps, 0.0)
    return policy


def keys(n: int) -> list[str]:
    return [f"user-{i}" for i in range(n)]


ALL = sorted(POLICIES)
WEIGHT_AWARE = sorted(set(ALL) - {"round_robin"})


def test_registry_names_are_the_documented_set() -> None:
    assert set(POLICIES) == {
        "round_robin", "weighted_round_robin", "random", "least_connections", "least_request",
        "ring_hash", "maglev", "source_hash", "sed", "nq",
    }
    for name, cls in POLICIES.items():
        assert cls.name == name


@pytest.mark.parametrize("name", ALL)
def test_empty_set_picks_nothing(name: str) -> None:
    p = make(name, [])
    assert p.pick("k", "s", 0.0) is None
    p.update(endpoints(3), 1.0)
    p.update([], 2.0)
    assert p.pick("k", "s", 2.0) is None


# One scenario step: replace the set, pick, or open/close a lease on some id.
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.lists(st.integers(0, 11), max_size=12, unique=True),
                  st.lists(st.integers(0, 3), min_size=12, max_size=12)),
        st.tuples(st.just("pick"), st.one_of(st.none(), st.text(max_size=4)), st.one_of(st.none(), st.text(max_size=4))),
        st.tuples(st.just("start"), st.integers(0, 13)),
        st.tuples(st.just("finish"), st.integers(0, 13), st.booleans(),
                  st.one_of(st.none(), st.floats(0, 5, allow_nan=False))),
    ),
    max_size=60,
)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=40, deadline=None)
@given(steps=_steps, seed=st.integers(0, 2**32))
def test_never_picks_outside_the_given_set(name: str, steps: list, seed: int) -> None:
    policy = POLICIES[name](rng=random.Random(seed), options={"table_size": 251} if name == "maglev" else None)
    current: list = []
    now = 0.0
    for step in steps:
        now += 0.25
        if step[0] == "update":
            _, chosen, ws = step
            current = [endpoints(12, ws)[i] for i in chosen]
            policy.update(current, now)
        elif step[0] == "pick":
            got = policy.pick(step[1], step[2], now)
            allowed = {ep for ep, _ in effective_weights(current)}
            if not current:
                assert got is None
            else:
                # Zero-weight endpoints are picked only when all weights are zero.
                assert got in allowed
        elif step[0] == "start":
            policy.on_start(f"ep{step[1]}", now)
        else:
            policy.on_finish(f"ep{step[1]}", step[2], step[3], now)


@pytest.mark.parametrize("name", ALL)
def test_zero_weight_is_never_picked_unless_all_are_zero(name: str) -> None:
    def picks(now: float) -> set[str]:
        out = set()
        for i in range(400):
            ep = p.pick(f"k{i}", f"s{i}", now)
            p.on_start(ep.id, now)  # leases stay open, so load-based policies spread too
            out.add(ep.id)
        return out

    p = make(name, endpoints(4, [0, 2, 0, 1]), seed=3)
    assert picks(0.0) == {"ep1", "ep3"}
    p = make(name, endpoints(3, [0, 0, 0]), seed=4)
    assert picks(1.0) == {"ep0", "ep1", "ep2"}


# sed is absent on purpose: idle, it always prefers the heaviest endpoint ((0 + 1) / w).
@pytest.mark.parametrize("name", ["random", "weighted_round_robin", "least_connections", "nq", "least_request"])
def test_weights_set_the_share_when_idle(name: str) -> None:
    p = make(name, endpoints(2, [1, 3]), seed=11)
    counts = Counter(p.pick(None, None, 0.0).id for _ in range(4000))
    assert 0.2 < counts["ep0"] / 4000 < 0.3


@pytest.mark.parametrize("name", ["random", "weighted_round_robin", "least_connections", "least_request"])
def test_effective_weights_override_catalog_weights(name: str) -> None:
    p = make(name, seed=5)
    p.update(endpoints(2, [1, 1]), 0.0, weights={"ep0": 0.25})
    counts = Counter(p.pick(None, None, 0.0).id for _ in range(5000))
    assert 0.15 < counts["ep0"] / 5000 < 0.25  # 0.25 / 1.25 = 0.2


def test_unknown_option_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="options.table_size: not an option of policy \"ring_hash\""):
        make("ring_hash", table_size=7)
    with pytest.raises(ConfigError, match="options.replicas: expected an integer"):
        make("ring_hash", replicas="many")
    with pytest.raises(ConfigError, match="options.decay: must be positive"):
        make("least_request", decay=0)
    with pytest.raises(ConfigError, match="must be a prime"):
        make("maglev", table_size=65536)
    assert make("least_request", decay=2).options == {"decay": 2, "choices": 2}


def test_round_robin_visits_each_in_turn_from_a_random_start() -> None:
    eps = endpoints(5)
    starts = set()
    for seed in range(20):
        p = make("round_robin", eps, seed=seed)
        seq = [p.pick(None, None, 0.0).id for _ in range(10)]
        assert sorted(seq[:5]) == [ep.id for ep in eps] and seq[:5] == seq[5:]
        starts.add(seq[0])
    assert len(starts) > 1
