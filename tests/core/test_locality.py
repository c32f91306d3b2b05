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


# ----------------------------------------------------------------- "nearest:N"

from softlb._locality import MAX_NEAREST, level_problem, nearest_count, rank_key  # noqa: E402


def ranked(i: str, rank: int | None, zone: str = "") -> Endpoint:
    return Endpoint(id=i, address="10.0.0.1", port=80, zone=zone, rank=rank)


def test_nearest_level_names() -> None:
    assert nearest_count("nearest:1") == 1 and nearest_count(f"nearest:{MAX_NEAREST}") == MAX_NEAREST
    for bad in ("nearest", "nearest:", "nearest:0", "nearest:-1", "nearest:x", "nearest:2 ", "nearest:١",
                f"nearest:{MAX_NEAREST + 1}", "near", "Nearest:2", "zone"):
        assert nearest_count(bad) is None, bad
    assert level_problem("nearest:3") == "" and level_problem("zone") == "" and level_problem("*") == ""
    assert "nearest:N" in level_problem("nearest") and "N from 1" in level_problem("nearest:0")
    assert "unknown level \"rack\"" in level_problem("rack")


def test_nearest_takes_the_n_lowest_ranks_in_catalog_order() -> None:
    eps = [ranked("a", 3), ranked("b", 0), ranked("c", 2), ranked("d", 1)]
    assert prefer_local(eps, ["nearest:2", "*"], HERE) == LocalChoice("nearest:2", (eps[1], eps[3]))
    assert ids(prefer_local(eps, ["nearest:3"], HERE)) == ["b", "c", "d"]
    assert ids(prefer_local(eps, ["nearest:9"], HERE)) == ["a", "b", "c", "d"]


def test_unranked_endpoints_sort_after_every_ranked_one() -> None:
    eps = [ranked("a", None), ranked("b", 7), ranked("c", None), ranked("d", 0)]
    assert ids(prefer_local(eps, ["nearest:2"], HERE)) == ["b", "d"]
    # Places the ranked ones leave go to unranked ones, by id.
    assert ids(prefer_local(eps, ["nearest:3"], HERE)) == ["a", "b", "d"]


def test_nearest_without_any_rank_falls_through() -> None:
    # No order from the source: the level matches nothing rather than N endpoints by name.
    eps = [ranked("a", None, zone="z1"), ranked("b", None, zone="z2")]
    assert prefer_local(eps, ["nearest:1"], HERE) == LocalChoice("", ())
    assert prefer_local(eps, ["nearest:1", "zone", "*"], HERE) == LocalChoice("zone", (eps[0],))
    assert prefer_local(eps, ["nearest:1", "*"], HERE).level == "*"
    assert prefer_local([], ["nearest:1", "*"], HERE) == LocalChoice("*", ())
    # A level before it still wins when it can.
    eps2 = [ranked("a", 1, zone="z1"), ranked("b", 0, zone="z2")]
    assert ids(prefer_local(eps2, ["zone", "nearest:1"], HERE)) == ["a"]


_ranks = st.one_of(st.none(), st.integers(0, 6))


@given(
    eps=st.lists(st.builds(ranked, st.text("uvwxyz", min_size=1, max_size=2), _ranks,
                           st.sampled_from(["", "z1", "z2"])),
                 max_size=8, unique_by=lambda e: e.id),
    n=st.integers(1, 5),
    before=st.sampled_from([[], ["zone"]]),
    after=st.sampled_from([[], ["zone"], ["*"], ["zone", "*"]]),
)
def test_nearest_level_properties(eps, n, before, after) -> None:
    level = f"nearest:{n}"
    pref = before + [level] + after
    choice = prefer_local(eps, pref, HERE)
    assert set(choice.endpoints) <= set(eps)
    assert [e for e in eps if e in choice.endpoints] == list(choice.endpoints)  # catalog order
    any_ranked = any(e.rank is not None for e in eps)
    if choice.level == level:
        assert any_ranked
        assert len(choice.endpoints) == min(n, len(eps))
        # The N lowest: nothing left out is nearer than anything taken.
        out = [e for e in eps if e not in choice.endpoints]
        if out:
            assert max(map(rank_key, choice.endpoints)) < min(map(rank_key, out))
        # An unranked endpoint is taken only when every ranked one is.
        if any(e.rank is None for e in choice.endpoints):
            assert all(e in choice.endpoints for e in eps if e.rank is not None)
    elif choice.level not in ("zone",) or not before:
        # The nearest level fell through only because nothing has a rank.
        assert not any_ranked
    if not eps and "*" in after:
        assert choice == LocalChoice("*", ())


def _balancer(locality, eps, panic_threshold=0):
    import random

    from softlb._balancer import ServiceBalancer
    from softlb._config import ServiceConfig

    b = ServiceBalancer("web", ServiceConfig(locality=locality, panic_threshold=panic_threshold),
                        random.Random(1), HERE)
    b.set_endpoints(eps, 0.0)
    return b


def _picks(b, n=60):
    return {b.pick(None, None, (), 0.0).id for _ in range(n)}


def test_nearest_moves_to_the_next_nearest_when_one_fails():
    from dataclasses import replace

    from softlb._types import RegistryHealth

    eps = [Endpoint(f"e{r}", "127.0.0.1", 9000 + r, rank=r) for r in range(5)]
    b = _balancer(("nearest:2", "*"), eps)
    assert _picks(b) == {"e0", "e1"} and b.locality_level == "nearest:2"
    b.set_endpoints([replace(eps[0], registry=RegistryHealth.CRITICAL)] + eps[1:], 0.0)
    assert _picks(b) == {"e1", "e2"}
    b.set_endpoints([replace(eps[0], registry=RegistryHealth.CRITICAL),
                     replace(eps[1], registry=RegistryHealth.MAINTENANCE)] + eps[2:], 0.0)
    assert _picks(b) == {"e2", "e3"}
    # A new order from the source (Consul re-sorted) moves the set with it.
    b.set_endpoints([replace(e, rank=4 - e.rank) for e in eps], 0.0)
    assert _picks(b) == {"e3", "e4"}


def test_nearest_in_panic_spreads_within_the_radius_of_the_eligible_ones():
    # The two nearest are critical and so is e4; 2/6 eligible < 50%: panic. The eligible
    # nearest two are e2 and e3, so panic serves every candidate at least as near: e0..e3,
    # not the farther e4/e5 (as a zone level in panic stays in the zone).
    from softlb._types import RegistryHealth

    crit, ok = RegistryHealth.CRITICAL, RegistryHealth.PASSING
    states = [crit, crit, ok, ok, crit, crit]
    eps = [Endpoint(f"e{r}", "127.0.0.1", 9000 + r, rank=r, registry=s) for r, s in enumerate(states)]
    b = _balancer(("nearest:2", "*"), eps, panic_threshold=50)
    assert b.panic and b.locality_level == "nearest:2"
    assert _picks(b, 200) == {"e0", "e1", "e2", "e3"}
