"""The change feed (CheckFeed over /v1/health/state/any), the fetch rate cap and the
negative cache for names Consul does not know: pure, with hypothesis where state moves."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softlb._consul import CheckFeed, ConsulDataError, catalog_service_names
from softlb._watchplan import NegativeCache, OnDemandLimitError, TokenBucket, WatchPlanner


def chk(node, cid, service="", sid="", status="passing", tags=(), output="", modify=1):
    return {"Node": node, "CheckID": cid, "ServiceName": service, "ServiceID": sid, "Status": status,
            "ServiceTags": list(tags), "Output": output, "ModifyIndex": modify}


BASE = [chk("n1", "serfHealth"), chk("n1", "service:a", "web", "a"), chk("n2", "serfHealth"),
        chk("n2", "service:b", "db", "b"), chk("n2", "service:c", "cache", "c")]


def test_first_answer_is_a_baseline_then_changes_name_services():
    f = CheckFeed()
    assert f.update(BASE) is None and f.primed
    assert f.names == {"web", "db", "cache"}
    assert f.update(BASE) == set()
    # Output-only (and ModifyIndex-only) changes are not changes we serve.
    assert f.update([*BASE[:1], chk("n1", "service:a", "web", "a", output="x", modify=9), *BASE[2:]]) == set()
    assert f.update([*BASE[:1], chk("n1", "service:a", "web", "a", status="critical"), *BASE[2:]]) == {"web"}
    # A node check flips: every service with a check on that node.
    nodes_down = [BASE[0], BASE[1], chk("n2", "serfHealth", status="critical"), BASE[3], BASE[4]]
    f2 = CheckFeed()
    f2.update(BASE)
    assert f2.update(nodes_down) == {"db", "cache"}
    # An instance added (new check) or removed (check gone); tags changed.
    assert f2.update(nodes_down + [chk("n3", "service:d", "web", "d")]) == {"web"}
    assert f2.update(nodes_down) == {"web"}
    assert f2.update([*nodes_down[:1], chk("n1", "service:a", "web", "a", tags=("v2",)), *nodes_down[2:]]) == {"web"}


def test_reset_and_bad_data():
    f = CheckFeed()
    f.update(BASE)
    f.reset()
    assert not f.primed and f.update(BASE) is None
    for bad in ({"x": 1}, [{"Node": 1, "CheckID": "c", "Status": "passing"}], [None]):
        with pytest.raises(ConsulDataError):
            f.update(bad)
    assert catalog_service_names({"web": ["a"], "consul": None}) == {"web": ("a",), "consul": ()}
    with pytest.raises(ConsulDataError):
        catalog_service_names({"web": "a"})


@given(st.lists(st.tuples(st.sampled_from(["n1", "n2"]), st.sampled_from(["a", "b", "c"]),
                          st.sampled_from(["passing", "critical"])), max_size=8), st.data())
def test_feed_reports_exactly_the_services_whose_checks_differ(first, data):
    second = data.draw(st.lists(st.tuples(st.sampled_from(["n1", "n2"]), st.sampled_from(["a", "b", "c"]),
                                          st.sampled_from(["passing", "critical"])), max_size=8))

    def checks(spec):
        return {(n, f"service:{s}"): chk(n, f"service:{s}", s, s, status=x) for n, s, x in spec}
    a, b = checks(first), checks(second)
    f = CheckFeed()
    f.update(list(a.values()))
    got = f.update(list(b.values()))
    want = {k[1].split(":")[1] for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert got == want


def test_token_bucket_caps_the_rate_after_a_burst():
    b = TokenBucket(rate=10, burst=3)
    sent = []
    t = 0.0
    while len(sent) < 13:
        d = b.delay(t)
        if d == 0:
            b.take(t)
            sent.append(t)
        else:
            t += d
    assert sent[:3] == [0.0, 0.0, 0.0]
    assert sent[-1] == pytest.approx(1.0)  # 10 more at 10/s


def test_negative_cache_expires_and_is_bounded():
    c = NegativeCache(ttl=10, max_entries=3)
    for i, name in enumerate("abcd"):
        c.add(name, float(i))
    assert len(c) == 3 and not c.hit("a", 4)  # evicted, oldest first
    assert c.hit("b", 5) and c.refused == 1
    assert not c.hit("b", 11.0) and len(c) == 2  # expired
    c.discard("c")
    assert not c.hit("c", 5)
    NegativeCache(ttl=0).add("x", 0)  # ttl 0: disabled, no error


def test_provisional_services_do_not_count_against_max_on_demand():
    p = WatchPlanner(max_watches=1, idle_timeout=60, max_on_demand=1)
    p.max_provisional = 2
    p.touch("x", 0, provisional=True)
    p.touch("y", 0, provisional=True)
    with pytest.raises(OnDemandLimitError, match="unconfirmed"):
        p.touch("z", 0, provisional=True)
    p.touch("real", 0)  # still room: the provisional ones do not count
    assert p.on_demand_count == 1
    p.forget("x")
    assert not p.is_wanted("x")
    p.confirm("y")  # Consul knew it: now counted (one over, once)
    assert p.on_demand_count == 2 and not p.is_provisional("y")


def test_feed_filter_names_the_polled_services_and_node_checks():
    from softlb._consul import feed_filter
    assert feed_filter([]) == 'ServiceName == ""'
    assert feed_filter(["web", "db.eu-1"]) == 'ServiceName == "" or ServiceName matches "^(db[.]eu-1|web)$"'


def test_speeding_the_round_robin_up_takes_effect_at_once():
    p = WatchPlanner(max_watches=0, idle_timeout=60, poll_period=600, max_poll_rate=1)
    p.configure(["a", "b"], 0)
    assert p.poll_due(0) == "a" and p.next_poll_at == 300  # 600 s / 2 services
    p.set_pace(1.0, 10, now=5)
    assert p.next_poll_at == 5.5 and p.poll_due(5.5) == "b"
    p.set_pace(600, 1, now=6)
    assert p.next_poll_at == 6.0  # slowing down never delays a turn already due
