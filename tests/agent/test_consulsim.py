"""The Consul API test server itself: blocking-query semantics, errors, agent endpoints."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import consul
import pytest

from tests.consulsim import AGENT_NODE, SimProcess, SimServer
from tests.consulsim.goparse import parse_go_bool, parse_go_duration


@pytest.fixture
def srv():
    with SimServer() as s:
        yield s


def get(url, headers=None, method="GET", data=None):
    req = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_go_parsing():
    assert parse_go_duration("1m30s") == 90 and parse_go_duration("250ms") == 0.25
    assert parse_go_duration("0") == 0 and parse_go_duration("1.5h") == 5400
    for bad in ("10", "", "s", "1x", "1s2"):
        with pytest.raises(ValueError):
            parse_go_duration(bad)
    assert parse_go_bool("True") and not parse_go_bool("F")
    with pytest.raises(ValueError):
        parse_go_bool("yes")


def test_blocking_query_semantics(srv):
    srv.sim.add_instance("web", id="a", port=80)
    status, h, body = get(srv.url + "/v1/health/service/web")
    idx = int(h["X-Consul-Index"])
    assert status == 200 and idx > 0 and len(json.loads(body)) == 1
    assert h["X-Consul-Knownleader"] == "true" and h["X-Consul-Lastcontact"] == "0"
    # Lower index: immediate. Untimed: with wait=10m a query that blocked would hit get()'s
    # 10 s client timeout and fail the test.
    status, h, _ = get(srv.url + f"/v1/health/service/web?index={idx - 1}&wait=10m")
    assert status == 200 and int(h["X-Consul-Index"]) == idx
    # Same index: blocks for at least wait, then 200 with the same index (a timeout, not a
    # change). That it ends at all is bounded by get()'s 10 s client timeout; the jitter's
    # upper bound (wait/16) is not timed here, it would flake on a loaded machine.
    t0 = time.monotonic()
    status, h, _ = get(srv.url + f"/v1/health/service/web?index={idx}&wait=400ms")
    took = time.monotonic() - t0
    assert status == 200 and int(h["X-Consul-Index"]) == idx
    assert took >= 0.4
    # A change wakes the query with a higher index.
    threading.Timer(0.2, lambda: srv.sim.set_check("a", "warning")).start()
    status, h, body = get(srv.url + f"/v1/health/service/web?index={idx}&wait=10s")
    assert int(h["X-Consul-Index"]) > idx
    assert json.loads(body)[0]["Checks"][-1]["Status"] == "warning"


def test_unknown_service_is_empty_array_and_never_index_zero(srv):
    srv.sim.set_index(0)
    status, h, body = get(srv.url + "/v1/health/service/nope")
    assert (status, body, h["X-Consul-Index"]) == (200, b"[]", "1")


def test_restore_ends_waits_and_index_goes_backwards(srv):
    srv.sim.add_instance("web", id="a", port=80)
    _, h, _ = get(srv.url + "/v1/health/service/web")
    idx = int(h["X-Consul-Index"])
    threading.Timer(0.2, lambda: srv.sim.set_index(2)).start()
    # The restore must end the 10 min wait: otherwise get()'s 10 s timeout fails the test.
    _, h, _ = get(srv.url + f"/v1/health/service/web?index={idx}&wait=10m")
    assert int(h["X-Consul-Index"]) == 2


@pytest.mark.parametrize("query, body", [
    ("index=1&wait=10", b"Invalid wait time"), ("index=x", b"Invalid index"),
    ("index=-1", b"Invalid index"), ("passing=maybe", b"Invalid value for ?passing"),
    ("stale&consistent", b"Cannot specify ?stale with ?consistent, conflicting semantics."),
])
def test_bad_parameters_are_400_with_consul_bodies(srv, query, body):
    assert get(srv.url + "/v1/health/service/web?" + query)[::2] == (400, body)


def test_passing_and_tag_filters(srv):
    srv.sim.add_instance("web", id="a", port=1, tags=["x", "y"])
    srv.sim.add_instance("web", id="b", port=2, tags=["x"], status="warning")
    ids = lambda q: [e["Service"]["ID"] for e in json.loads(get(srv.url + "/v1/health/service/web" + q)[2])]
    assert ids("") == ["a", "b"]
    assert ids("?passing") == ["a"] and ids("?passing=1") == ["a"] and ids("?passing=false") == ["a", "b"]
    assert ids("?tag=x&tag=y") == ["a"] and ids("?tag=x") == ["a", "b"]
    srv.sim.set_node("node-1", health="critical")
    assert ids("?passing") == []


def test_catalog_services_blocks_on_catalog_changes(srv):
    srv.sim.add_instance("web", id="a", port=1, tags=["x"])
    _, h, body = get(srv.url + "/v1/catalog/services")
    assert json.loads(body) == {"web": ["x"]}
    threading.Timer(0.2, lambda: srv.sim.add_instance("db", id="d", port=2)).start()
    _, _, body = get(srv.url + f"/v1/catalog/services?index={h['X-Consul-Index']}&wait=10s")
    assert json.loads(body) == {"db": [], "web": ["x"]}


def test_generic_errors(srv):
    assert get(srv.url + "/v1/nope")[::2] == (404, b"")
    status, h, body = get(srv.url + "/v1/health/service/web", method="PUT", data=b"")
    assert (status, h["Allow"], body) == (405, "GET", b"method PUT not allowed")
    assert get(srv.url + "/v1/health/service/")[::2] == (400, b"Missing service name")


def test_acl_tokens(srv):
    srv.sim.set_acl("s3cret")
    srv.sim.add_instance("web", id="a", port=1)
    # No token = the anonymous token: reads are filtered (agent/acl.go), writes refused.
    status, h, body = get(srv.url + "/v1/health/service/web")
    assert (status, body, h.get("X-Consul-Results-Filtered-By-Acls")) == (200, b"[]", "true")
    assert get(srv.url + "/v1/agent/service/deregister/a", method="PUT", data=b"")[::2] == \
        (403, b"Permission denied")
    assert get(srv.url + "/v1/health/service/web", {"X-Consul-Token": "bad"})[::2] == (403, b"ACL not found")
    for ok in ({"X-Consul-Token": "s3cret"}, {"Authorization": "Bearer s3cret"}):
        assert get(srv.url + "/v1/health/service/web", ok)[0] == 200
    assert get(srv.url + "/v1/health/service/web?token=s3cret")[0] == 200


def test_faults_and_counters(srv):
    srv.sim.set_fault("500", count=1)
    assert get(srv.url + "/v1/health/service/web")[0] == 500
    srv.sim.set_fault("garbage", count=1, body="{oops")
    assert get(srv.url + "/v1/health/service/web")[::2] == (200, b"{oops")
    srv.sim.set_fault("drop", count=1)
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(srv.url + "/v1/health/service/web", timeout=5).read()
    srv.sim.set_fault("stall")
    result = []
    t = threading.Thread(target=lambda: result.append(get(srv.url + "/v1/health/service/web")[0]))
    t.start()
    time.sleep(0.3)
    assert not result
    srv.sim.clear_faults()
    t.join(5)
    assert result == [200]
    assert srv.sim.get_counts()["/v1/health/service/web"] == 4  # 500, garbage, drop, stall
    assert get(srv.url + "/v1/health/service/web")[0] == 200
    assert srv.sim.get_counts()["/v1/health/service/web"] == 5


def test_agent_endpoints_with_py_consul(srv):
    """py-consul's own requests (lower-case keys, enable=True) against the server."""
    c = consul.Consul(host="127.0.0.1", port=srv.port)
    c.token = None
    assert c.agent.service.register("api", service_id="api-1", port=9, tags=["t"],
                                    check=consul.Check.ttl("10s"))
    assert srv.sim.checks[(AGENT_NODE, "service:api-1")].status == "critical"  # TTL default
    assert c.agent.check.ttl_warn("service:api-1", "slow")
    chk = srv.sim.checks[(AGENT_NODE, "service:api-1")]
    assert (chk.status, chk.output) == ("warning", "slow")
    assert c.agent.service.maintenance("api-1", True, "upgrade")
    _, nodes = c.health.service("api")
    assert any(ch["CheckID"] == "_service_maintenance:api-1" and ch["Notes"] == "upgrade"
               for ch in nodes[0]["Checks"])
    assert c.agent.service.maintenance("api-1", False)
    assert "api-1" in c.agent.services()
    assert c.agent.service.deregister("api-1")
    # Current Consul: 404 for a check it does not know, which py-consul turns into False.
    assert c.agent.check.ttl_pass("service:api-1") is False
    assert get(srv.url + "/v1/agent/service/deregister/api-1", method="PUT", data=b"")[0] == 404


def test_register_snake_case_and_checks_array(srv):
    body = {"name": "db", "id": "db-1", "port": 5432, "tagged_addresses": {"lan": {"address": "10.0.0.5", "port": 5432}},
            "Checks": [{"check_id": "c1", "ttl": "5s", "status": "passing"},
                       {"TCP": "127.0.0.1:1", "Interval": "1s"}]}
    assert get(srv.url + "/v1/agent/service/register", method="PUT", data=json.dumps(body).encode())[0] == 200
    inst = srv.sim.instances[(AGENT_NODE, "db-1")]
    assert inst.tagged == {"lan": {"Address": "10.0.0.5", "Port": 5432}}
    assert {k[1] for k in srv.sim.checks if k[0] == AGENT_NODE} >= {"c1", "service:db-1:2"}
    bad = {"name": "x", "Check": {"HTTP": "http://127.0.0.1:1/"}}
    assert get(srv.url + "/v1/agent/service/register", method="PUT", data=json.dumps(bad).encode())[0] == 400


def test_subprocess_mode_and_http_control():
    with SimProcess() as p:
        p.control.add_instance(service="web", id="a", port=80)
        status, h, body = get(p.url + "/v1/health/service/web")
        assert status == 200 and json.loads(body)[0]["Service"]["ID"] == "a"
        assert p.control.get_counts() == {"/v1/health/service/web": 1}
        with pytest.raises(RuntimeError, match="KeyError"):
            p.control.remove_instance(id="missing")
    assert p.proc.poll() is not None


# --------------------------------------------------------------------------- current Consul


def test_unknown_ttl_check_is_404_and_py_consul_returns_false(srv):
    status, _, body = get(srv.url + "/v1/agent/check/pass/nope", method="PUT", data=b"")
    assert status == 404 and body.startswith(b'Unknown check ID "nope"')
    c = consul.Consul(host="127.0.0.1", port=srv.port)
    assert c.agent.check.ttl_pass("nope") is False  # CB.boolean does not raise on 404


def test_acl_filtered_token_gets_empty_answers_with_the_header(srv):
    srv.sim.add_instance("web", id="a", port=1)
    srv.sim.set_acl("full")
    srv.sim.set_acl_filtered(["reader-without-node-read"])
    for path, empty in (("/v1/health/service/web", b"[]"), ("/v1/catalog/services", b"{}"),
                        ("/v1/health/state/any", b"[]")):
        status, h, body = get(srv.url + path, {"X-Consul-Token": "reader-without-node-read"})
        assert (status, body, h["X-Consul-Results-Filtered-By-Acls"]) == (200, empty, "true")
        status, h, body = get(srv.url + path, {"X-Consul-Token": "full"})
        assert status == 200 and body != empty and "X-Consul-Results-Filtered-By-Acls" not in h


def test_streaming_backend_headers(srv):
    srv.sim.add_instance("web", id="a", port=1)
    srv.sim.set_backend("streaming")
    _, h, _ = get(srv.url + "/v1/health/service/web")  # index 0: the RPC path
    assert (h["X-Consul-Query-Backend"], h["X-Consul-Knownleader"]) == ("blocking-query", "true")
    idx = h["X-Consul-Index"]
    _, h, _ = get(srv.url + f"/v1/health/service/web?index={int(idx) - 1}")
    assert (h["X-Consul-Query-Backend"], h["X-Consul-Knownleader"], h["X-Consul-Lastcontact"]) == \
        ("streaming", "false", "0")
    assert h["X-Cache"] in ("HIT", "MISS")
    _, h, _ = get(srv.url + f"/v1/health/service/web?index={int(idx) - 1}&near=_agent")
    assert h["X-Consul-Query-Backend"] == "blocking-query"  # ?near disables streaming


def test_cache_hit_miss_age_and_serving_after_losing_servers(srv):
    srv.sim.add_instance("web", id="a", port=1)
    _, h, body = get(srv.url + "/v1/health/service/web?cached")
    assert h["X-Cache"] == "MISS" and "Age" not in h
    _, h, _ = get(srv.url + "/v1/health/service/web?cached")
    assert (h["X-Cache"], h["Age"]) == ("HIT", "0")
    srv.sim.set_servers_lost(True)
    srv.sim.add_instance("web", id="b", port=2)  # the servers' state moves on, unseen
    time.sleep(1.1)
    _, h, body2 = get(srv.url + "/v1/health/service/web?cached")
    assert h["X-Cache"] == "HIT" and int(h["Age"]) >= 1 and body2 == body
    assert get(srv.url + "/v1/health/service/web")[0] == 500  # no cache: needs a server
    srv.sim.set_servers_lost(False)
    _, h, body3 = get(srv.url + "/v1/health/service/web?cached")
    assert h["Age"] == "0" and b'"b"' in body3


def test_rate_limit_429_with_retry_after(srv):
    srv.sim.set_fault("429", count=1, retry_after="7")
    status, h, body = get(srv.url + "/v1/health/service/web")
    assert (status, h["Retry-After"], body) == (429, "7", b"")


def test_tags_match_case_insensitively(srv):
    srv.sim.add_instance("web", id="a", port=1, tags=["Primary"])
    assert len(json.loads(get(srv.url + "/v1/health/service/web?tag=primary")[2])) == 1
    assert json.loads(get(srv.url + "/v1/health/service/web?tag=other")[2]) == []


def test_datacenter(srv):
    srv.sim.add_instance("web", id="a", port=1)
    assert get(srv.url + "/v1/health/service/web?dc=dc1")[0] == 200
    assert get(srv.url + "/v1/health/service/web?dc=elsewhere")[::2] == (500, b"No path to datacenter")


def test_health_state_any_feed_and_catalog_index(srv):
    srv.sim.add_instance("web", id="a", port=1)
    _, h, body = get(srv.url + "/v1/health/state/any")
    checks = json.loads(body)
    assert {c["CheckID"] for c in checks} >= {"serfHealth", "service:a"}
    idx = int(h["X-Consul-Index"])
    _, h2, _ = get(srv.url + "/v1/catalog/services")
    cat = int(h2["X-Consul-Index"])
    srv.sim.update_instance("a", port=2)  # a service write: catalog moves, checks do not
    assert int(get(srv.url + "/v1/health/state/any")[1]["X-Consul-Index"]) == idx
    assert int(get(srv.url + "/v1/catalog/services")[1]["X-Consul-Index"]) > cat
    srv.sim.set_check("a", "critical")
    _, h, body = get(srv.url + "/v1/health/state/any")
    assert int(h["X-Consul-Index"]) > idx
    assert [c["ModifyIndex"] for c in json.loads(body) if c["CheckID"] == "service:a"] == [int(h["X-Consul-Index"])]
    assert get(srv.url + "/v1/health/state/bogus")[0] == 400


def test_filter_subset_node_meta_and_near(srv):
    srv.sim.add_node("n2", "127.0.0.2", meta={"zone": "b"})
    srv.sim.add_instance("web", id="a", port=1, tags=["x"], meta={"v": "1"})
    srv.sim.add_instance("web", id="b", node="n2", port=2, meta={"v": "2"})
    ids = lambda q: [e["Service"]["ID"] for e in json.loads(get(srv.url + "/v1/health/service/web?" + q)[2])]
    assert ids('filter="x"+in+Service.Tags') == ["a"]
    assert ids('filter=Service.Meta.v+%3D%3D+"2"') == ["b"]
    assert ids("node-meta=zone:b") == ["b"]
    srv.sim.set_coordinate("n2", rtt=0.0)
    srv.sim.set_coordinate("node-1", rtt=0.010)
    assert ids("near=n2") == ["b", "a"] and ids("near=node-1") == ["a", "b"]
    assert get(srv.url + '/v1/health/service/web?filter=Service.Port+>+1')[0] == 400
    # The change feed's filter: node checks, or checks of the named services.
    checks = json.loads(get(srv.url + "/v1/health/state/any?filter=" + urllib.parse.quote(
        'ServiceName == "" or ServiceName matches "^(web|db[.]x)$"'))[2])
    assert {(c["CheckID"], c["ServiceName"]) for c in checks} == {
        ("serfHealth", ""), ("service:a", "web"), ("service:b", "web")}


def test_endless_body_fault(srv):
    srv.sim.set_fault("endless", count=1)
    with urllib.request.urlopen(srv.url + "/v1/health/service/web", timeout=5) as r:
        assert r.status == 200
        assert len(r.read(5_000_000)) == 5_000_000


def test_near_sorts_by_modelled_round_trip_time(srv):
    # Consul's rtt.go: the source's coordinate against each node's (serf DistanceTo), a stable
    # sort; nodes without a coordinate last in store order; no source coordinate, no sort.
    for i, n in enumerate(["n1", "n2", "n3", "n4", "n5"]):
        srv.sim.add_node(n, f"127.0.0.{i + 2}")
        srv.sim.add_instance("web", id=f"w{i + 1}", node=n, port=8000 + i)
    url = srv.url + "/v1/health/service/web?"

    def nodes(q):
        status, h, body = get(url + q)
        assert status == 200
        return [e["Node"]["Node"] for e in json.loads(body)]

    store = nodes("")
    assert store == ["n1", "n2", "n3", "n4", "n5"]
    assert nodes("near=_agent") == store  # the agent has no coordinate yet
    srv.sim.set_coordinate(AGENT_NODE, rtt=0.0)
    assert nodes("near=_agent") == store  # ... and none of the nodes: all +Inf, stable
    srv.sim.set_coordinate("n3", rtt=0.002)
    srv.sim.set_coordinate("n5", rtt=0.001)
    srv.sim.set_coordinate("n1", rtt=0.002)  # ties n3: store order between them
    assert nodes("near=_agent") == ["n5", "n1", "n3", "n2", "n4"]
    # Height and adjustment count as serf counts them (vectors 1 ms apart, +heights).
    srv.sim.set_coordinate("n2", rtt=0.0005, height=0.001)
    assert nodes("near=_agent") == ["n5", "n2", "n1", "n3", "n4"]  # 1.5 ms
    srv.sim.set_coordinate("n2", rtt=0.0005, height=0.001, adjustment=-0.0009)  # 0.6 ms
    assert nodes("near=_agent")[0] == "n2"
    srv.sim.set_coordinate("n4", vec=[0.0] * 8, adjustment=-1.0)  # a non-positive sum: unadjusted
    assert nodes("near=_agent")[0] == "n4"
    # Another source node; a source with no coordinate leaves the store's order.
    assert nodes("near=n3")[:2] == ["n1", "n3"]  # at the same spot: a tie, store order
    assert nodes("near=n2&passing")[0] == "n2"
    assert nodes("near=nobody") == store
    with pytest.raises(Exception, match="8 numbers"):
        srv.sim.set_coordinate("n1", vec=[1.0])
    # A new coordinate moves no index: a blocking watcher is not woken by it.
    _, h, _ = get(url + "near=_agent")
    idx = h["X-Consul-Index"]
    srv.sim.set_coordinate("n4", rtt=9.0)
    t0 = time.monotonic()
    _, h2, body = get(url + f"near=_agent&index={idx}&wait=300ms")
    assert h2["X-Consul-Index"] == idx and time.monotonic() - t0 >= 0.3
    assert json.loads(body)[-1]["Node"]["Node"] == "n4"  # the order itself is current
