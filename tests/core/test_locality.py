"""Locality preference: nearest level with endpoints, '*' the only fallback."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softlb import Endpoint
from softlb._locality import LEVELS, LocalChoice, Locality, prefer_local

HERE = Locality(node="n1", zone="z1", region="r1")


def ep(i: str, node: str = "", zone: str = "", region: str = "") -> Endpoint:
    return Endpoint(id=i, address="10.0.0.1", port=80, node=node, zone=zone, region=region)


SAME_NODE = ep("a", "n1", "z1", "r1")
SAME_ZONE = ep("b", "n2", "z1", "r1")
SAME_REGION = ep("c", "n3", "z2", "r1")
ELSEWHERE = ep("d", "n4", "z9", "r9")
ALL = [SAME_NODE, SAME_ZONE, SAME_REGION, ELSEWHERE]
FULL = ["node", "zone", "region", "*"]


def ids(choice: LocalChoice) -> list[str]:
    return [e.id for e in choice.endpoints]


def test_no_preference_serves_everything() -> None:
    assert prefer_local(ALL, [], HERE) == LocalChoice("", tuple(ALL))


def test_nearest_level_with_endpoints_wins() -> None:
    assert prefer_local(ALL, FULL, HERE) == LocalChoice("node", (SAME_NODE,))
    # The zone level includes the same-node endpoint: levels nest, they do not exclude.
    assert ids(prefer_local(ALL[1:], FULL, HERE)) == ["b"]
    assert ids(prefer_local(ALL, ["zone", "*"], HERE)) == ["a", "b"]
    assert prefer_local(ALL[2:], FULL, HERE).level == "region"
    assert prefer_local([ELSEWHERE], FULL, HERE) == LocalChoice("*", (ELSEWHERE,))


def test_without_star_there_is_no_fallback() -> None:
    assert prefer_local([ELSEWHERE, SAME_REGION], ["node", "zone"], HERE) == LocalChoice("", ())
    assert prefer_local([], FULL, HERE) == LocalChoice("*", ())


def test_an_unlabelled_agent_matches_nothing_at_that_level() -> None:
    # Unlabelled endpoints must not count as "same zone" as an agent without a zone.
    unlabelled = [ep("x"), ep("y")]
    assert prefer_local(unlabelled, ["zone"], Locality()) == LocalChoice("", ())
    assert ids(prefer_local(unlabelled, ["zone", "*"], Locality())) == ["x", "y"]
    assert prefer_local(ALL, ["node", "zone", "region"], Locality(region="r1")).level == "region"


def test_unknown_level_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown locality level 'rack'"):
        prefer_local(ALL, ["rack"], HERE)


_labels = st.sampled_from(["", "a", "b"])


@given(
    eps=st.lists(st.builds(ep, st.text("xyz", min_size=1, max_size=3), _labels, _labels, _labels), max_size=8),
    pref=st.lists(st.sampled_from(LEVELS[:3]), unique=True).flatmap(
        lambda p: st.sampled_from([p, p + ["*"]])
    ),
    here=st.builds(Locality, _labels, _labels, _labels),
)
def test_result_is_a_subset_matching_its_level(eps, pref, here) -> None:
    choice = prefer_local(eps, pref, here)
    assert set(choice.endpoints) <= set(eps)
    if choice.level in ("node", "zone", "region"):
        assert choice.endpoints and all(getattr(e, choice.level) == getattr(here, choice.level) for e in choice.endpoints)
        # No earlier level could have served.
        for level in pref[: pref.index(choice.level)]:
            assert not getattr(here, level) or not any(getattr(e, level) == getattr(here, level) for e in eps)
    if "*" in pref and eps:
        assert choice.endpoints


def test_panic_picks_its_locality_level_from_eligible_endpoints():
    # 10 endpoints: our zone's 2 are both critical; 4 of the 8 elsewhere pass (40% < 50%:
    # panic). The nearest level with eligible endpoints is "*", so panic spreads over all,
    # never only over the dead local pair.
    import random

    from softlb._balancer import ServiceBalancer
    from softlb._config import ServiceConfig
    from softlb._types import RegistryHealth

    crit, ok = RegistryHealth.CRITICAL, RegistryHealth.PASSING
    eps = [Endpoint(f"local-{i}", "127.0.0.1", 1000 + i, zone="z1", registry=crit) for i in range(2)]
    eps += [Endpoint(f"far-{i}", "127.0.0.1", 2000 + i, zone="z2", registry=ok if i < 4 else crit) for i in range(8)]
    b = ServiceBalancer("web", ServiceConfig(locality=("zone", "*")), random.Random(1), Locality(zone="z1"))
    b.set_endpoints(eps, 0.0)
    assert b.panic
    picks = {b.pick(None, None, (), 0.0).id for _ in range(100)}
    assert picks == {e.id for e in eps}
    # Without "*" there is no fallback, in panic as outside it: stay in the zone.
    b2 = ServiceBalancer("web", ServiceConfig(locality=("zone",)), random.Random(1), Locality(zone="z1"))
    b2.set_endpoints(eps, 0.0)
    assert {b2.pick(None, None, (), 0.0).id for _ in range(20)} == {"local-0", "local-1"}
