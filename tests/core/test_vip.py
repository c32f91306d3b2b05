"""Service addresses: parsing, uniqueness, pool assignment (deterministic, collision-free),
and the `vip` field in the protocol's services/endpoints answers."""

import ipaddress
import random

import msgpack
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from softlb import ConfigError, Endpoint, Engine, encode_frame, parse_agent_config, parse_request, respond
from softlb._vip import Vip, VipTable, check_unique, parse_pool, parse_vip
from softlb.policies import POLICIES

POOL = "127.77.0.0/16"


def cfg(**agent):
    return parse_agent_config({"agent": agent, "services": {}}, frozenset(POLICIES))


def test_parse_vip_forms():
    assert parse_vip("127.77.0.5:8080") == Vip("127.77.0.5", 8080)
    assert parse_vip("127.77.0.5") == Vip("127.77.0.5", 0)
    assert str(parse_vip("127.77.0.5")) == "127.77.0.5"
    assert Vip("127.77.0.5", 0).matches("127.77.0.5", 1234)
    assert not Vip("127.77.0.5", 80).matches("127.77.0.5", 81)


@pytest.mark.parametrize("bad, says", [
    ("10.0.0.5:80", "not a loopback"),
    ("::1:80", "expected IPv4"),
    ("127.77.0.5:0", "port must be"),
    ("127.77.0.5:70000", "port must be"),
    ("127.77.0.5:http", "port must be"),
    ("web", "expected IPv4"),
])
def test_parse_vip_refuses(bad, says):
    with pytest.raises(ValueError, match=says):
        parse_vip(bad)


@pytest.mark.parametrize("bad, says", [
    ("10.0.0.0/8", "not inside"),
    ("127.77.0.1/16", "expected a subnet"),
    ("127.77.0.4/31", "too small"),
    ("nope", "expected a subnet"),
])
def test_parse_pool_refuses(bad, says):
    with pytest.raises(ValueError, match=says):
        parse_pool(bad)


def test_uniqueness():
    assert check_unique({"a": Vip("127.77.0.5", 80), "b": Vip("127.77.0.5", 81)}) == ""
    assert "both claim 127.77.0.5:80" in check_unique({"a": Vip("127.77.0.5", 80), "b": Vip("127.77.0.5", 80)})
    assert "overlap" in check_unique({"a": Vip("127.77.0.5", 0), "b": Vip("127.77.0.5", 81)})


def test_config_validates_vips_with_the_key_path():
    ok = parse_agent_config({"services": {"web": {"vip": "127.77.0.5:8080"}}})
    assert ok.service("web").vip == "127.77.0.5:8080"
    with pytest.raises(ConfigError, match=r"services\.web\.vip: .*not a loopback"):
        parse_agent_config({"services": {"web": {"vip": "192.168.1.1:80"}}})
    with pytest.raises(ConfigError, match="services: services a and b both claim"):
        parse_agent_config({"services": {"a": {"vip": "127.77.0.5:80"}, "b": {"vip": "127.77.0.5:80"}}})
    with pytest.raises(ConfigError, match=r"agent\.vip_pool: .*not inside"):
        cfg(vip_pool="10.0.0.0/16")
    with pytest.raises(ConfigError, match=r"is the agent's own agent\.listen"):
        parse_agent_config({"agent": {"listen": "127.0.0.9:7070"}, "services": {"a": {"vip": "127.0.0.9"}}})


def test_config_validates_dns_settings():
    assert cfg(dns="127.0.0.1:5353", dns_domain="lb.internal", dns_answer="vip").dns == "127.0.0.1:5353"
    with pytest.raises(ConfigError, match=r"agent\.dns: 10\.1\.1\.1 is not a loopback"):
        cfg(dns="10.1.1.1:53")
    with pytest.raises(ConfigError, match=r"agent\.dns_domain"):
        cfg(dns_domain="bad..domain")
    with pytest.raises(ConfigError, match=r"agent\.dns_answer"):
        cfg(dns_answer="both")


def test_pool_assignment_is_a_function_of_the_name():
    """A restart (a fresh table) gives every name the same address, whatever the order."""
    names = [f"svc-{i}" for i in range(300)]
    a = VipTable({}, parse_pool(POOL))
    a.assign(names)
    b = VipTable({}, parse_pool(POOL))
    b.assign(reversed(names))  # one batch is assigned in name order, whatever the input order
    assert a.assigned == b.assigned
    net = ipaddress.IPv4Network(POOL)
    addrs = [v.address for v in a.assigned.values()]
    assert len(set(addrs)) == len(addrs)
    assert all(ipaddress.IPv4Address(x) in net for x in addrs)
    assert all(x not in (str(net.network_address), str(net.broadcast_address)) for x in addrs)


def test_collisions_probe_onward_and_are_reported():
    t = VipTable({}, parse_pool("127.77.0.0/29"))  # 6 usable addresses
    t.assign([f"s{i}" for i in range(6)])
    assert len({v.address for v in t.assigned.values()}) == 6
    assert t.collisions, "six names in six slots must collide somewhere"
    t.assign(["one-too-many"])
    assert t.get("one-too-many") is None
    assert ("one-too-many", 64, False) in t.collisions


def test_explicit_addresses_are_never_handed_out_by_the_pool():
    pool = parse_pool("127.77.0.0/29")
    explicit = {f"e{i}": Vip(f"127.77.0.{i}", 80) for i in range(1, 6)}  # 5 of the 6 usable
    t = VipTable(explicit, pool)
    t.assign(["x"])
    assert t.get("x") == Vip("127.77.0.6", 0)


def test_reload_keeps_pool_addresses():
    t = VipTable({}, parse_pool(POOL))
    t.assign(["a", "b"])
    before = dict(t.assigned)
    t2 = t.rebuilt({"c": Vip("127.77.9.9", 0)}, parse_pool(POOL), ["a", "b", "c"])
    assert t2.get("a") == before["a"] and t2.get("b") == before["b"]
    assert t2.get("c") == Vip("127.77.9.9", 0)
    t3 = t.rebuilt({}, None, ["a", "b"])
    assert t3.get("a") is None


class VipTableMachine(RuleBasedStateMachine):
    """Services come and go in any order: addresses stay unique, inside the pool, clear of
    explicit VIPs, and a name keeps its address for as long as it exists."""

    def __init__(self):
        super().__init__()
        self.explicit = {"pinned": Vip("127.77.0.3", 0)}
        self.t = VipTable(self.explicit, parse_pool("127.77.0.0/28"))  # 14 usable: collisions happen
        self.live: dict[str, Vip | None] = {}

    @rule(name=st.sampled_from([f"n{i}" for i in range(20)]))
    def add(self, name):
        self.t.assign([name])
        v = self.t.get(name)
        if name in self.live:
            assert v == self.live[name]
        self.live[name] = v

    @rule(name=st.sampled_from([f"n{i}" for i in range(20)]))
    def remove(self, name):
        self.t.release(name)
        self.live.pop(name, None)

    @invariant()
    def unique_and_in_pool(self):
        addrs = [v.address for v in self.t.assigned.values()]
        assert len(addrs) == len(set(addrs))
        assert "127.77.0.3" not in addrs
        assert set(self.t.assigned) <= set(self.live)
        for name, v in self.live.items():
            assert self.t.get(name) == v


TestVipTableMachine = VipTableMachine.TestCase
TestVipTableMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# ------------------------------------------------------------------- in the engine's answers


def _answer(engine, msg):
    """The op's result as a socket caller decodes it (the typed request, the engine, the
    frame the protocol object encodes)."""
    req = parse_request(msg)
    frame = encode_frame({"id": msg["id"], "result": respond(engine, req, 0.0, None)})
    return msgpack.unpackb(frame[4:], raw=False)["result"]


def test_answers_carry_the_vip_only_when_there_is_one():
    conf = parse_agent_config({"agent": {"vip_pool": POOL},
                               "services": {"web": {"vip": "127.77.0.5:8080"}}}, frozenset(POLICIES))
    e = Engine(conf, random.Random(1))
    e.replace_all({"web": [Endpoint("w1", "127.0.0.1", 1)], "db": [Endpoint("d1", "127.0.0.1", 2)]}, 0.0)
    services = {s["name"]: s for s in _answer(e, {"id": 1, "op": "services"})}
    assert services["web"]["vip"] == {"address": "127.77.0.5", "port": 8080}
    db_vip = services["db"]["vip"]
    assert db_vip["port"] == 0 and ipaddress.IPv4Address(db_vip["address"]) in ipaddress.IPv4Network(POOL)
    assert _answer(e, {"id": 2, "op": "endpoints", "service": "web"})["vip"] == {"address": "127.77.0.5", "port": 8080}
    assert _answer(e, {"id": 3, "op": "hello"})["vip_pool"] == POOL

    plain = Engine(parse_agent_config({}), random.Random(1))
    plain.replace_all({"web": [Endpoint("w1", "127.0.0.1", 1)]}, 0.0)
    assert "vip" not in _answer(plain, {"id": 1, "op": "services"})[0]
    assert "vip" not in _answer(plain, {"id": 2, "op": "endpoints", "service": "web"})
    assert "vip_pool" not in _answer(plain, {"id": 3, "op": "hello"})


def test_a_reload_that_moves_a_vip_tells_watchers():
    e = Engine(parse_agent_config({"services": {"web": {"vip": "127.77.0.5:80"}}}), random.Random(1))
    e.replace_all({"web": [Endpoint("w1", "127.0.0.1", 1)], "db": [Endpoint("d1", "127.0.0.1", 2)]}, 0.0)
    version = e.services["db"].version
    changed = e.reconfigure(parse_agent_config({"agent": {"vip_pool": POOL},
                                                "services": {"web": {"vip": "127.77.0.5:80"}}}), 1.0)
    assert changed == {"db"}  # web's config and VIP are unchanged
    assert e.services["db"].version > version and e.services["db"].vip is not None


def test_a_removed_service_frees_its_pool_address():
    e = Engine(parse_agent_config({"agent": {"vip_pool": "127.77.0.0/30"}}), random.Random(1))  # 2 usable
    e.set_service("a", [], 0.0)
    e.set_service("b", [], 0.0)
    e.set_service("c", [], 0.0)
    assert e.services["c"].vip is None  # pool full
    e.remove_service("a", 0.0)
    e.set_service("c2", [], 0.0)
    assert e.services["c2"].vip is not None
