"""The Engine through its protocol entry point, as the agent drives it."""

import random
from collections import Counter

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softlb import AgentConfig, Endpoint, ErrorCode, RegistryHealth, ServiceConfig
from softlb._engine import Engine
from softlb._errors import RequestError
from tests.core.engine_calls import handle, resolve


def eps(n, **kw):
    return [Endpoint(id=f"e{i}", address="127.0.0.1", port=8000 + i, **kw) for i in range(n)]


def ask(engine, msg, now=0.0, source=None):
    frame = handle(engine, msg, now, source)
    assert frame is not None
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    return msgpack.unpackb(frame[4:])


@pytest.fixture
def engine():
    e = Engine(AgentConfig(), random.Random(7))
    e.replace_all({"web": eps(3), "api": eps(2)}, 0.0)
    return e


def test_round_robin_rotates_over_every_endpoint(engine):
    ids = [ask(engine, {"id": i, "op": "resolve", "service": "web"})["result"]["id"] for i in range(9)]
    assert Counter(ids) == {"e0": 3, "e1": 3, "e2": 3}
    assert ids[:3] == ids[3:6] == ids[6:]


def test_resolve_answer_shape(engine):
    ans = ask(engine, {"id": "x", "op": "resolve", "service": "api"})
    assert ans["id"] == "x"
    r = ans["result"]
    assert set(r) == {"address", "port", "id", "tags", "meta", "weight", "node", "zone", "region", "lease", "panic", "stale"}
    assert isinstance(r["lease"], int) and r["panic"] is False and r["stale"] is False
    assert ask(engine, {"id": 1, "op": "resolve", "service": "api", "lease": False})["result"]["lease"] is None


@pytest.mark.parametrize(
    "msg, code",
    [
        ({"id": 1, "op": "resolve", "service": "nope"}, "UNKNOWN_SERVICE"),
        ({"id": 1, "op": "resolve"}, "BAD_ARGUMENT"),
        ({"id": 1, "op": "resolve", "service": 5}, "BAD_ARGUMENT"),
        ({"id": 1, "op": "resolve", "service": "web", "tags": "v2"}, "BAD_ARGUMENT"),
        ({"id": 1, "op": "resolve", "service": "web", "key": 5}, "BAD_ARGUMENT"),
        ({"id": 1, "op": "resolve", "service": "web", "lease": "yes"}, "BAD_ARGUMENT"),
        ({"id": 1, "op": "frobnicate"}, "UNKNOWN_OP"),
        ({"id": 1}, "BAD_ARGUMENT"),
        ({"op": "services"}, "BAD_ARGUMENT"),
        ({"id": True, "op": "services"}, "BAD_ARGUMENT"),
        ({"id": 1, "op": "hello", "versions": [7, 8]}, "UNSUPPORTED_VERSION"),
        ({"id": 1, "op": "hello", "versions": "1"}, "BAD_ARGUMENT"),
        ({"id": 1, "op": "report", "lease": 999}, "UNKNOWN_LEASE"),
        ({"id": 1, "op": "report"}, "BAD_ARGUMENT"),
        ({"id": 1, "op": "report", "service": "web", "endpoint": "zz"}, "BAD_ARGUMENT"),
        ({"id": 1, "op": "report", "lease": 1, "latency": -1}, "BAD_ARGUMENT"),
        ({"id": 1, "op": "endpoints", "service": "nope"}, "UNKNOWN_SERVICE"),
    ],
)
def test_errors_carry_stable_codes(engine, msg, code):
    ans = ask(engine, msg)
    assert ans["error"]["code"] == code and ans["error"]["message"]
    assert ans["id"] == (msg["id"] if isinstance(msg.get("id"), int) and not isinstance(msg.get("id"), bool) else None)


def test_no_healthy_endpoint_and_tag_filters():
    e = Engine(AgentConfig(), random.Random(1))
    e.replace_all({"web": eps(2, registry=RegistryHealth.MAINTENANCE), "empty": [],
                   "tagged": eps(1) + [Endpoint(id="t", address="h", port=1, tags=("v2", "x"))]}, 0.0)
    for svc in ("web", "empty"):
        assert ask(e, {"id": 1, "op": "resolve", "service": svc})["error"]["code"] == "NO_HEALTHY_ENDPOINT"
    assert ask(e, {"id": 1, "op": "resolve", "service": "tagged", "tags": ["v2"]})["result"]["id"] == "t"
    assert ask(e, {"id": 1, "op": "resolve", "service": "tagged", "tags": ["nope"]})["error"]["code"] == "NO_HEALTHY_ENDPOINT"


def test_all_critical_is_panic_but_maintenance_never_gets_traffic():
    e = Engine(AgentConfig(), random.Random(1))
    e.replace_all({"web": eps(2, registry=RegistryHealth.CRITICAL) + [
        Endpoint(id="m", address="h", port=1, registry=RegistryHealth.MAINTENANCE)]}, 0.0)
    answers = [ask(e, {"id": i, "op": "resolve", "service": "web"})["result"] for i in range(8)]
    assert {a["id"] for a in answers} == {"e0", "e1"} and all(a["panic"] for a in answers)


def test_panic_spreads_over_all_when_too_few_are_eligible():
    e = Engine(AgentConfig(services={"web": ServiceConfig(panic_threshold=50)}), random.Random(1))
    e.replace_all({"web": eps(1) + eps(3, registry=RegistryHealth.CRITICAL)[1:]}, 0.0)
    answers = [ask(e, {"id": i, "op": "resolve", "service": "web"})["result"] for i in range(6)]
    assert all(a["panic"] for a in answers) and {a["id"] for a in answers} == {"e0", "e1", "e2"}


def test_report_by_lease_closes_it(engine):
    lease = ask(engine, {"id": 1, "op": "resolve", "service": "web"})["result"]["lease"]
    assert len(engine.leases) == 1
    assert ask(engine, {"id": 2, "op": "report", "lease": lease, "ok": False, "latency": 0.1})["result"] == {}
    assert len(engine.leases) == 0
    assert ask(engine, {"id": 3, "op": "report", "lease": lease})["error"]["code"] == "UNKNOWN_LEASE"
    assert ask(engine, {"id": 4, "op": "report", "service": "web", "endpoint": "e1", "ok": True})["result"] == {}


def test_leases_expire_on_tick(engine):
    engine.leases.ttl = 10
    ask(engine, {"id": 1, "op": "resolve", "service": "web"}, now=0.0)
    ask(engine, {"id": 2, "op": "resolve", "service": "web"}, now=5.0)
    assert engine.tick(9.0)[1] == 10.0
    assert engine.tick(10.0)[1] == 15.0 and len(engine.leases) == 1
    assert engine.tick(15.0)[1] is None and len(engine.leases) == 0


def test_lease_table_is_bounded():
    e = Engine(AgentConfig(), random.Random(1))
    e.leases.max_leases = 5
    e.replace_all({"web": eps(2)}, 0.0)
    for i in range(20):
        resolve(e, "web", 0.0)
    assert len(e.leases) == 5


def test_services_endpoints_and_hello(engine):
    svcs = ask(engine, {"id": 1, "op": "services"})["result"]
    assert [s["name"] for s in svcs] == ["api", "web"] and svcs[1]["endpoints"] == 3
    d = ask(engine, {"id": 2, "op": "endpoints", "service": "web"})["result"]
    assert [x["id"] for x in d["endpoints"]] == ["e0", "e1", "e2"] and all(x["eligible"] for x in d["endpoints"])
    h = ask(engine, {"id": 3, "op": "hello", "versions": [1, 2]})["result"]
    assert h["version"] == 1 and "resolve" in h["ops"]


def test_streaming_ops_are_left_to_the_connection(engine):
    assert handle(engine, {"id": 1, "op": "watch", "service": "web"}, 0.0) is None


def test_catalog_changes_notify_and_versions_move(engine):
    v = engine.services["web"].version
    assert engine.replace_all({"web": eps(3), "api": eps(2)}, 1.0) == frozenset()
    changed = engine.replace_all({"web": eps(4)}, 2.0)
    assert changed == {"api", "web"} and engine.services["web"].version > v
    assert "api" not in engine.services


def test_reconfigure_switches_settings_and_keeps_serving(engine):
    before = engine.services["web"]
    engine.reconfigure(AgentConfig(services={"web": ServiceConfig(panic_threshold=10)}), 1.0)
    after = engine.services["web"]
    assert after is not before and after.endpoints == before.endpoints
    assert engine.services["api"] is not None
    assert ask(engine, {"id": 1, "op": "resolve", "service": "web"})["result"]["id"].startswith("e")


def test_resolve_raises_for_direct_callers(engine):
    with pytest.raises(RequestError) as e:
        resolve(engine, "nope", 0.0)
    assert e.value.code is ErrorCode.UNKNOWN_SERVICE


@given(st.dictionaries(st.text(max_size=8), st.none() | st.integers() | st.text(max_size=8) | st.booleans()
                       | st.lists(st.integers(), max_size=3), max_size=6))
def test_any_map_gets_exactly_one_well_formed_answer(msg):
    e = Engine(AgentConfig(), random.Random(1))
    e.replace_all({"web": eps(2)}, 0.0)
    frame = handle(e, msg, 0.0)
    if frame is None:
        assert msg.get("op") in ("watch", "unwatch")
        return
    ans = msgpack.unpackb(frame[4:])
    assert ("result" in ans) != ("error" in ans)


def test_reload_changing_the_tag_filter_reapplies_it_to_the_whole_catalog():
    e = Engine(AgentConfig(services={"web": ServiceConfig(tags=("v2",))}), random.Random(1))
    e.replace_all({"web": eps(2) + [Endpoint(id="t", address="h", port=1, tags=("v2",))]}, 0.0)
    assert [x.id for x in e.services["web"].endpoints] == ["t"]
    e.reconfigure(AgentConfig(), 1.0)
    assert [x.id for x in e.services["web"].endpoints] == ["e0", "e1", "t"]


def test_default_outlier_settings_eject_in_a_small_service():
    e = Engine(AgentConfig(), random.Random(1))
    e.replace_all({"web": eps(3)}, 0.0)
    for _ in range(5):
        e.report(0.0, ok=False, service="web", endpoint_id="e1")
    assert {resolve(e, "web", 0.1, lease=False).endpoint.id for _ in range(6)} == {"e0", "e2"}


@pytest.mark.parametrize("latency", [float("inf"), float("nan"), -1.0])
def test_latency_must_be_finite(engine, latency):
    ans = ask(engine, {"id": 1, "op": "report", "service": "web", "endpoint": "e1", "latency": latency})
    assert ans["error"]["code"] == "BAD_ARGUMENT"


def test_tag_filter_policies_are_bounded_and_misses_not_cached():
    from softlb._balancer import MAX_TAG_POLICIES

    e = Engine(AgentConfig(), random.Random(1))
    e.replace_all({"web": [Endpoint(id=f"t{i}", address="h", port=i + 1, tags=("a", f"t{i}")) for i in range(100)]}, 0.0)
    b = e.services["web"]
    for i in range(100):
        assert resolve(e, "web", 0.0, tags=("a", f"t{i}"), lease=False).endpoint.id == f"t{i}"
    assert len(b._tag_policies) == MAX_TAG_POLICIES
    for i in range(500):
        with pytest.raises(RequestError):
            resolve(e, "web", 0.0, tags=(f"nope{i}",), lease=False)
    assert len(b._tag_policies) == MAX_TAG_POLICIES


def test_leases_reach_tag_filtered_least_connections():
    e = Engine(AgentConfig(services={"web": ServiceConfig(policy="least_connections")}), random.Random(1))
    e.replace_all({"web": [Endpoint(id=x, address="h", port=i + 1, tags=("v2",)) for i, x in enumerate("ab")]}, 0.0)
    # Leases held open: least_connections must alternate, so the split stays within one.
    picks = Counter(resolve(e, "web", 0.0, tags=("v2",)).endpoint.id for _ in range(20))
    assert picks == {"a": 10, "b": 10}


def test_duplicate_endpoint_ids_keep_the_first_and_apply_whole():
    e = Engine(AgentConfig(), random.Random(1))
    dup = [Endpoint(id="a", address="h", port=1), Endpoint(id="b", address="h", port=2), Endpoint(id="a", address="h", port=3)]
    e.set_service("web", dup, 0.0)
    b = e.services["web"]
    assert [(x.id, x.port) for x in b.endpoints] == [("a", 1), ("b", 2)]
    assert set(b.packed) == {"a", "b"} and {x.id for x in b.served} == {"a", "b"}


def test_a_new_service_with_no_endpoints_is_announced():
    e = Engine(AgentConfig(), random.Random(1))
    assert e.set_service("empty", [], 0.0) == {"empty"}
    assert not e.set_service("empty", [], 1.0)


def test_expired_leases_reach_tag_filtered_policies():
    e = Engine(AgentConfig(services={"web": ServiceConfig(policy="least_connections")}), random.Random(1))
    e.leases.ttl = 10
    e.replace_all({"web": [Endpoint(id=x, address="h", port=i + 1, tags=("v2",)) for i, x in enumerate("ab")]}, 0.0)
    for _ in range(10):
        resolve(e, "web", 0.0, tags=("v2",))  # five leases on each, never reported
    e.tick(20.0)  # all expire
    b = e.services["web"]
    assert not b.load.active and b._tag_policies[("v2",)].load is b.load


@pytest.mark.parametrize("policy", ["least_connections", "least_request", "sed", "nq"])
def test_tag_policies_rebuilt_by_a_refresh_keep_the_leases_in_flight(policy):
    from softlb._config import ProbeConfig

    e = Engine(AgentConfig(services={"web": ServiceConfig(policy=policy, probe=ProbeConfig(fall=1))}),
               random.Random(3))
    e.replace_all({"web": [Endpoint(x, "127.0.0.1", 1000 + i, tags=("v2",)) for i, x in enumerate("abc")]}, 0.0)
    for _ in range(9):
        resolve(e, "web", 0.0, tags=("v2",))  # leases held open
    e.probe_result("web", "c", False, 1.0)  # an unrelated change: refresh, tag cache rebuilt
    resolve(e, "web", 1.0, tags=("v2",))
    b = e.services["web"]
    tagged = b._tag_policies[("v2",)]
    # One board per service, read by every view: nothing to copy, nothing to drift.
    assert tagged.load is b.policy.load is b.load
    assert sum(b.load.active.values()) == 10


def test_a_held_lease_counts_in_least_connections_until_finished():
    from softlb import LeaseScope

    e = Engine(AgentConfig(lease_ttl=60.0, services={"web": ServiceConfig(policy="least_connections")}),
               random.Random(2))
    e.replace_all({"web": eps(2)}, 0.0)
    held = e.pick("web", 0.0, scope=LeaseScope.HELD)
    busy = held.endpoint.id
    now = 0.0
    while now < 300.0:  # five minutes of timer ticks: a request lease would long be gone
        now += 7.0
        e.tick(now)
        assert e.services["web"].load.in_flight(busy) == 1
        # With one connection held open on `busy`, every new pick goes to the other one.
        assert resolve(e, "web", now, lease=False).endpoint.id != busy
    e.finish(held.lease, now, ok=True)
    assert e.services["web"].load.in_flight(busy) == 0
    assert {resolve(e, "web", now, lease=False).endpoint.id for _ in range(10)} == {"e0", "e1"}
    with pytest.raises(RequestError) as err:
        e.finish(held.lease, now)
    assert err.value.code is ErrorCode.UNKNOWN_LEASE


def test_request_leases_still_expire_by_the_clock():
    from softlb import LeaseScope

    e = Engine(AgentConfig(lease_ttl=60.0, services={"web": ServiceConfig(policy="least_connections")}),
               random.Random(2))
    e.replace_all({"web": eps(2)}, 0.0)
    p = e.pick("web", 0.0, scope=LeaseScope.REQUEST)
    e.tick(61.0)
    assert e.services["web"].load.in_flight(p.endpoint.id) == 0
    with pytest.raises(RequestError):
        e.finish(p.lease, 61.0)


def test_a_reload_keeps_held_leases_counted_across_a_policy_switch():
    from softlb import LeaseScope

    e = Engine(AgentConfig(services={"web": ServiceConfig(policy="least_connections")}), random.Random(2))
    e.replace_all({"web": eps(2)}, 0.0)
    held = e.pick("web", 0.0, scope=LeaseScope.HELD)
    e.reconfigure(AgentConfig(services={"web": ServiceConfig(policy="least_request")}), 1.0)
    assert e.services["web"].load.in_flight(held.endpoint.id) == 1
    e.finish(held.lease, 2.0)
    assert e.services["web"].load.in_flight(held.endpoint.id) == 0


def test_weight_zero_is_never_picked_when_a_filter_leaves_only_drained_endpoints():
    e = Engine(AgentConfig(), random.Random(1))
    e.replace_all({"web": [Endpoint(id="live", address="h", port=1, weight=1),
                           Endpoint(id="drained", address="h", port=2, weight=0, tags=("v2",))]}, 0.0)
    with pytest.raises(RequestError) as err:
        resolve(e, "web", 0.0, tags=("v2",))
    assert err.value.code is ErrorCode.NO_HEALTHY_ENDPOINT
    assert {resolve(e, "web", 0.0).endpoint.id for _ in range(10)} == {"live"}
    # Health leaving only the drained one: no pick either.
    e.report(0.0, ok=False, service="web", endpoint_id="live")
    for _ in range(10):
        e.report(0.0, ok=False, service="web", endpoint_id="live")
    b = e.services["web"]
    assert all(x.id != "drained" for x in b.served)
    # A catalog that zeroes every weight still serves (all count as 1).
    e.replace_all({"web": [Endpoint(id=x, address="h", port=i + 1, weight=0) for i, x in enumerate("ab")]}, 1.0)
    assert {resolve(e, "web", 1.0, lease=False).endpoint.id for _ in range(10)} == {"a", "b"}


def test_leaving_an_all_zero_catalog_restores_the_catalog_weights():
    e = Engine(AgentConfig(services={"web": ServiceConfig(policy="weighted_round_robin")}), random.Random(1))
    e.replace_all({"web": [Endpoint(id=x, address="h", port=i + 1, weight=0) for i, x in enumerate("ab")]}, 0.0)
    e.replace_all({"web": [Endpoint(id="a", address="h", port=1, weight=9), Endpoint(id="b", address="h", port=2, weight=1)]}, 1.0)
    picks = Counter(resolve(e, "web", 1.0, lease=False).endpoint.id for _ in range(100))
    assert picks == {"a": 90, "b": 10}


POLICIES = ["round_robin", "weighted_round_robin", "least_connections", "least_request", "ring_hash", "maglev",
            "source_hash", "random", "nq", "sed"]


@settings(deadline=None)
@given(st.sampled_from(POLICIES), st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.booleans(),
                                                     st.floats(0.0, 2.0)), max_size=40))
def test_pick_held_is_pick_with_a_held_lease(policy, steps):
    """The proxy's `pick_held` answers and counts as `pick(scope=HELD)` does: same
    endpoints, same lease ids, same load, counters and outlier verdicts afterwards."""
    from softlb import LeaseScope

    def make():
        e = Engine(AgentConfig(services={"web": ServiceConfig(policy=policy)}), random.Random(7))
        e.replace_all({"web": [Endpoint(f"e{i}", "127.0.0.1", 1000 + i, weight=1 + i % 3) for i in range(4)]}, 0.0)
        return e

    a, b = make(), make()
    open_a: list[int] = []
    open_b: list[int] = []
    now = 0.0
    for pick, n, ok, dt in steps:
        now += dt
        if pick or not open_a:
            key = f"k{n}" if n % 2 else None
            pa = a.pick("web", now, key=key, source=f"10.0.0.{n}", scope=LeaseScope.HELD)
            ep, lease = b.pick_held("web", now, key=key, source=f"10.0.0.{n}")
            assert (pa.endpoint, pa.lease) == (ep, lease)
            open_a.append(pa.lease)
            open_b.append(lease)
        else:
            i = n % len(open_a)
            assert a.finish(open_a.pop(i), now, ok=ok, latency=dt) == b.finish(open_b.pop(i), now, ok=ok, latency=dt)
    sa, sb = a.services["web"], b.services["web"]
    assert sa.load.active == sb.load.active and len(a.leases) == len(b.leases) == len(open_a)
    assert sa.counters.resolved == sb.counters.resolved
    assert {i: c.picks for i, c in sa.counters.endpoints.items()} == {i: c.picks for i, c in sb.counters.endpoints.items()}
    assert [x.id for x in sa.served] == [x.id for x in sb.served]


def test_pick_held_unknown_and_pending_as_pick():
    e = Engine(AgentConfig(), random.Random(1))
    with pytest.raises(RequestError) as err:
        e.pick_held("nope", 0.0)
    assert err.value.code is ErrorCode.UNKNOWN_SERVICE
    e.on_demand = True
    assert type(e.pick_held("nope", 0.0)).__name__ == "Pending"
    e.on_demand = False
    e.replace_all({"web": []}, 0.0)
    codes = []
    for call in (lambda: e.pick_held("web", 1.0), lambda: e.pick("web", 1.0)):
        with pytest.raises(RequestError) as err:
            call()
        codes.append((err.value.code, err.value.message))
    assert codes[0] == codes[1] and codes[0][0] is ErrorCode.NO_HEALTHY_ENDPOINT
