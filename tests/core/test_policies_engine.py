"""Policies wired into the Engine: config, keys, sources, leases, locality, slow start,
and switching policy on reload."""

from __future__ import annotations

import random
from collections import Counter

import msgpack
import pytest

from softlb import AgentConfig, ConfigError, Endpoint, ErrorCode, RegistryHealth, ServiceConfig, parse_agent_config
from softlb._engine import Engine
from softlb._errors import RequestError
from softlb.policies import POLICIES
from tests.core.engine_calls import handle
from tests.core.engine_calls import resolve as engine_resolve


def eps(n: int, **kw) -> list[Endpoint]:
    return [Endpoint(id=f"e{i}", address="127.0.0.1", port=8000 + i, **kw) for i in range(n)]


def engine_with(seed: int = 7, endpoints=None, **service) -> Engine:
    e = Engine(AgentConfig(services={"web": ServiceConfig(**service)}), random.Random(seed))
    e.replace_all({"web": endpoints if endpoints is not None else eps(5)}, 0.0)
    return e


def resolve(e: Engine, now: float = 0.0, source: str | None = None, **args) -> dict:
    frame = handle(e, {"id": 1, "op": "resolve", "service": "web", **args}, now, source)
    return msgpack.unpackb(frame[4:])


@pytest.mark.parametrize("policy", ["ring_hash", "maglev"])
def test_key_from_the_protocol_is_stable_across_engines(policy: str) -> None:
    first = {k: resolve(engine_with(1, policy=policy), key=k)["result"]["id"] for k in map(str, range(50))}
    again = {k: resolve(engine_with(2, policy=policy), key=k)["result"]["id"] for k in map(str, range(50))}
    assert first == again and len(set(first.values())) == 5
    # bytes keys hash the same way every time too
    e = engine_with(3, policy=policy)
    assert len({resolve(e, key=b"\xff\x00k")["result"]["id"] for _ in range(10)}) == 1


def test_source_hash_follows_the_caller() -> None:
    e = engine_with(policy="source_hash")
    assert len({resolve(e, source="1000:4242")["result"]["id"] for _ in range(20)}) == 1
    assert len({resolve(e, source=f"1000:{pid}")["result"]["id"] for pid in range(200)}) == 5


def test_leases_feed_least_connections() -> None:
    e = engine_with(policy="least_connections", endpoints=eps(2))
    a = resolve(e)["result"]
    b = resolve(e)["result"]
    assert a["id"] != b["id"]  # the first lease made its endpoint busier
    e.report(0.1, ok=True, lease=a["lease"])
    assert resolve(e, lease=False)["result"]["id"] == a["id"]
    # An expired lease closes too: b's endpoint is free again after the TTL.
    e.report(0.2, ok=True, lease=resolve(e)["result"]["lease"])
    e.tick(1000.0)
    assert e.services["web"].load.active == {}


def test_reports_with_latency_steer_least_request() -> None:
    e = engine_with(policy="least_request", endpoints=eps(3))
    for t in range(30):
        for i in range(3):
            e.report(float(t), ok=True, latency=0.5 if i == 0 else 0.01, service="web", endpoint_id=f"e{i}")
    picks = Counter(resolve(e, 30.0, lease=False)["result"]["id"] for _ in range(600))
    assert picks["e0"] < 30


def test_locality_prefers_the_agents_zone_then_falls_back() -> None:
    here = [Endpoint(id=f"z1-{i}", address="10.0.0.1", port=i + 1, zone="z1") for i in range(2)]
    there = [Endpoint(id=f"z2-{i}", address="10.0.0.2", port=i + 1, zone="z2") for i in range(2)]
    cfg = AgentConfig(zone="z1", services={"web": ServiceConfig(locality=("zone", "*"))})
    e = Engine(cfg, random.Random(1))
    e.replace_all({"web": here + there}, 0.0)
    assert {resolve(e, lease=False)["result"]["id"] for _ in range(10)} == {"z1-0", "z1-1"}
    assert e.services["web"].locality_level == "zone"
    down = [Endpoint(id=ep.id, address=ep.address, port=ep.port, zone="z1", registry=RegistryHealth.CRITICAL) for ep in here]
    e.set_service("web", down + there, 1.0)  # the zone's endpoints fail: any zone will do
    assert {resolve(e, 1.0, lease=False)["result"]["id"] for _ in range(20)} == {"z2-0", "z2-1"}
    assert e.services["web"].locality_level == "*"


def test_locality_without_star_has_no_fallback_and_says_why() -> None:
    cfg = AgentConfig(zone="z1", services={"web": ServiceConfig(locality=("node", "zone"))})
    e = Engine(cfg, random.Random(1))
    e.replace_all({"web": eps(3, zone="z9")}, 0.0)
    with pytest.raises(RequestError) as err:
        engine_resolve(e, "web", 0.0)
    assert err.value.code is ErrorCode.NO_HEALTHY_ENDPOINT
    assert "locality" in err.value.message and "\"*\"" in err.value.message


def test_slow_start_ramps_a_newcomer_through_engine_ticks() -> None:
    e = engine_with(policy="weighted_round_robin", slow_start=10.0, endpoints=eps(2))
    e.set_service("web", eps(3), 1.0)  # e2 joins at t=1

    def share(now: float) -> float:
        return Counter(resolve(e, now, lease=False)["result"]["id"] for _ in range(1000))["e2"] / 1000

    assert share(1.0) == pytest.approx(0.1 / 2.1, abs=0.01)
    deadline = e.tick(1.0)[1]
    assert deadline is not None and deadline <= 1.5
    e.tick(6.0)
    assert share(6.0) == pytest.approx(0.5 / 2.5, abs=0.01)
    e.tick(11.0)
    assert share(11.0) == pytest.approx(1 / 3, abs=0.01)
    assert e.services["web"].ramp_deadline is None


def test_slow_start_is_ignored_by_hash_policies() -> None:
    e = engine_with(policy="maglev", slow_start=10.0, endpoints=eps(2))
    e.set_service("web", eps(3), 1.0)
    assert e.services["web"].slow_start is None and e.tick(1.0)[1] is None


@pytest.mark.parametrize("old,new", [("round_robin", "maglev"), ("least_connections", "least_request"),
                                     ("sed", "ring_hash"), ("maglev", "nq")])
def test_switching_policy_on_reload_keeps_serving(old: str, new: str) -> None:
    e = engine_with(policy=old)
    leases = [resolve(e)["result"]["lease"] for _ in range(5)]
    e.reconfigure(AgentConfig(services={"web": ServiceConfig(policy=new)}), 1.0)
    assert type(e.services["web"].policy) is POLICIES[new]
    for lease in leases:  # leases opened under the old policy still close cleanly
        e.report(1.5, ok=True, lease=lease)
    assert resolve(e, 2.0, key="k", lease=False)["result"]["id"].startswith("e")
    assert getattr(e.services["web"].policy, "active", {}) == {}


def test_moving_the_agent_rebuilds_locality() -> None:
    zoned = [Endpoint(id="a", address="10.0.0.1", port=1, zone="z1"), Endpoint(id="b", address="10.0.0.2", port=1, zone="z2")]
    svc = {"web": ServiceConfig(locality=("zone",))}
    e = Engine(AgentConfig(zone="z1", services=svc), random.Random(1))
    e.replace_all({"web": zoned}, 0.0)
    assert resolve(e)["result"]["id"] == "a"
    e.reconfigure(AgentConfig(zone="z2", services=svc), 1.0)
    assert resolve(e, 1.0)["result"]["id"] == "b"


def test_config_checks_policy_options_at_parse_time() -> None:
    doc = {"services": {"web": {"policy": "ring_hash", "options": {"table_size": 7}}}}
    with pytest.raises(ConfigError, match="services.web.options.table_size: not an option of policy \"ring_hash\""):
        parse_agent_config(doc, frozenset(POLICIES))
    ok = parse_agent_config({"services": {"web": {"policy": "maglev", "slow_start": "30s", "locality": ["zone", "*"],
                                                   "options": {"table_size": 251}}}}, frozenset(POLICIES))
    assert ok.service("web").slow_start == 30.0 and ok.service("web").options == {"table_size": 251}
