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
