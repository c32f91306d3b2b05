"""The watcher against current Consul's behaviour (issue 13), as the test server models it:
ACL filtering, the streaming backend, the agent cache's Age, start-up load on the servers,
the change feed for polled services, per-service query options, and hostile answers
(endless bodies, hostile header values, 429 with Retry-After)."""

from __future__ import annotations

import tracemalloc

import pytest
import trio

from softlb._config import ConsulConfig
from softlb_agent.consul_http import ConsulClient, consul_settings
from tests.consulsim import SimServer
from tests.consulsim.testing import agent_config, run, until, watching


@pytest.fixture
def srv():
    with SimServer() as s:
        yield s


# --------------------------------------------------------------------------- 2. ACL filtering


def test_acl_filtered_answer_is_acl_denied_never_an_empty_service(srv):
    srv.sim.add_instance("web", id="a", port=80)
    srv.sim.add_instance("db", id="d", port=81)
    srv.sim.set_acl("full")
    srv.sim.set_acl_filtered(["no-node-read"])

    async def body():
        # A fresh agent with a token that may not read: nothing is published (UNAVAILABLE
        # to callers), the state says which permissions are missing.
        cfg = agent_config(srv.url, services=("web",), token="no-node-read")
        async with watching(cfg) as (src, rec):
            await until(lambda: src.status.state == "acl_denied")
            await trio.sleep(0.3)
            assert "web" not in rec.current
            assert "node:read" in src.status.detail and "service:read" in src.status.detail
        # With data from a good token first, then a token losing read rights: the last
        # set stays, stale, however long the empty-set guard's hold would have been.
        cfg = agent_config(srv.url, services=("web",), token="full", keep_previous_on_empty=0.0)
        async with watching(cfg) as (src, rec):
            await until(lambda: rec.eps("web"))
            src._client._token = "no-node-read"  # the operator swapped the token file
            # The blocking query already waiting was sent with the old token: let it end
            # (same data) before the catalog changes, or it would read b with the old rights.
            srv.sim.bump_index("web")
            await until(lambda: src.status.state == "acl_denied")
            srv.sim.add_instance("web", id="b", port=82)
            await trio.sleep(0.3)
            assert [e.port for e in rec.eps("web")] == [80] and rec.stale("web")
    run(body)


# --------------------------------------------------------------------------- 3. streaming


def test_streaming_answers_are_not_stale(srv):
    srv.sim.add_instance("web", id="a", port=80)
    srv.sim.set_backend("streaming")

    async def body():
        async with watching(agent_config(srv.url)) as (src, rec):
            await until(lambda: rec.eps("web"))
            srv.sim.add_instance("web", id="b", port=81)  # answered by the streaming backend
            await until(lambda: len(rec.eps("web")) == 2)
            log = srv.sim.get_log()
            assert any("index=" in q for _, p, q in log if p == "/v1/health/service/web")
            assert not rec.stale("web")
            # A server without a leader on the RPC path still reads as stale.
            srv.sim.set_backend("blocking-query")
            srv.sim.set_leader(known=False)
            srv.sim.add_instance("web", id="c", port=82)
            await until(lambda: len(rec.eps("web")) == 3 and rec.stale("web"))
    run(body)


# --------------------------------------------------------------------------- 4. cache Age


def test_cached_answers_go_stale_when_the_agent_lost_its_servers(srv):
    for s in ("web", "db"):
        srv.sim.add_instance(s, id=f"{s}-1", port=80)

    async def body():
        # db is polled with ?cached (max_watches 1). Default max_stale (5 s); once the
        # servers are gone the change feed fails and the poller goes back to its pace.
        cfg = agent_config(srv.url, services=("web", "db"), max_watches=1)
        async with watching(cfg, poll_period=0.2) as (src, rec):
            await until(lambda: rec.eps("db") and not rec.stale("db"))
            srv.sim.set_servers_lost(True)
            # The cache keeps answering, 200, with a growing Age: stale past max_stale.
            await until(lambda: rec.stale("db"), timeout=12)
            _, _, fetched_at = rec.current["db"]
            assert trio.current_time() - fetched_at >= 4.5  # its age is the cache's Age (whole seconds)
            srv.sim.set_servers_lost(False)
            await until(lambda: not rec.stale("db"), timeout=5)
    run(body, timeout=30)


# --------------------------------------------------------------------------- 5. start-up load


def test_stale_reads_are_the_default_with_max_stale():
    c = ConsulConfig()
    assert c.stale and c.max_stale > 0
    s = consul_settings(c, {})
    assert s.stale and s.max_stale == c.max_stale


def test_startup_is_spread_and_first_fetches_are_rate_capped(srv):
    names = [f"s{i}" for i in range(40)]
    for n in names:
        srv.sim.add_instance(n, id=f"{n}-1", port=80)

    async def body():
        # Defaults: 10 blocking watches spread over 500 ms; 30 polled services first-fetched
        # at <= 20/s after a burst of 20 (they used to go back to back).
        cfg = agent_config(srv.url, services=names, max_watches=10)
        async with watching(cfg) as (src, rec):
            await until(lambda: all(rec.eps(n) for n in names), timeout=10)
        log = [(t, p[len("/v1/health/service/"):], q) for t, p, q in srv.sim.get_log()
               if p.startswith("/v1/health/service/")]
        first: dict[str, tuple[float, str]] = {}
        for t, name, q in log:
            first.setdefault(name, (t, q))
        blocking = sorted(first[n][0] for n in names[:10])
        polled = sorted(first[n][0] for n in names[10:])
        assert blocking[-1] - blocking[0] > 0.15
        assert polled[-1] - polled[0] > 0.35  # 10 past the burst of 20, at 20/s
        assert all("stale" in q for _, (_, q) in first.items())
    run(body)


# --------------------------------------------------------------------------- 6. environment


def test_environment_follows_consuls_go_api(tmp_path):
    from softlb._config import ConsulQuery
    from softlb_agent.consul_http import query_params
    tok = tmp_path / "token"
    tok.write_text("from-file\n")
    env = {"CONSUL_HTTP_TOKEN": "from-env", "CONSUL_HTTP_TOKEN_FILE": str(tok),
           "CONSUL_HTTP_ADDR": "http://consul.example:8500", "CONSUL_HTTP_SSL": "true",
           "CONSUL_CAPATH": str(tmp_path), "CONSUL_TLS_SERVER_NAME": "consul.internal",
           "CONSUL_HTTP_AUTH": "ops:pw:with:colons", "CONSUL_NAMESPACE": "team-a",
           "CONSUL_PARTITION": "part-1"}
    s = consul_settings(ConsulConfig(), env)
    assert s.token == "from-file"  # the file beats the variable, as in Consul's api
    assert s.base_url == "https://consul.example:8500"  # CONSUL_HTTP_SSL upgrades http://
    assert (s.capath, s.tls_server_name, s.auth) == (str(tmp_path), "consul.internal", ("ops", "pw:with:colons"))
    assert query_params(s, None) == [("ns", "team-a"), ("partition", "part-1")]
    # Config beats the environment, per service too.
    assert consul_settings(ConsulConfig(token="cfg"), env).token == "cfg"
    q = ConsulQuery(namespace="team-b", peer="east", filter='"x" in Service.Tags',
                    node_meta={"rack": "r1", "az": "a"}, near="_agent")
    assert query_params(s, q) == [("ns", "team-b"), ("partition", "part-1"), ("peer", "east"),
                                  ("filter", '"x" in Service.Tags'), ("node-meta", "az:a"),
                                  ("node-meta", "rack:r1"), ("near", "_agent")]


def test_basic_auth_and_query_options_reach_consul(srv):
    from softlb._config import ConsulQuery
    srv.sim.add_node("n2", "127.0.0.2", meta={"rack": "r2"})
    srv.sim.add_instance("web", id="a", port=80, tags=["canary"])
    srv.sim.add_instance("web", id="b", node="n2", port=81)

    async def body():
        cfg = agent_config(srv.url, services=("web", "api"))
        cfg = cfg.__class__(**{**cfg.__dict__, "consul": ConsulConfig(
            **{**cfg.consul.__dict__, "services": {"web": ConsulQuery(node_meta={"rack": "r2"})}})})
        async with watching(cfg) as (src, rec):
            await until(lambda: [e.port for e in rec.eps("web")] == [81])
        assert any("node-meta=rack%3Ar2" in q for _, p, q in srv.sim.get_log() if p == "/v1/health/service/web")
    run(body)


def test_near_order_becomes_ranks_and_a_resort_is_republished(srv):
    from softlb._config import ConsulQuery
    from tests.consulsim import AGENT_NODE
    srv.sim.set_coordinate(AGENT_NODE, rtt=0.0)
    for i, (node, ms) in enumerate((("n1", 3), ("n2", 1), ("n3", None))):
        srv.sim.add_node(node, f"127.0.0.{i + 2}")
        srv.sim.add_instance("web", id=f"w{i + 1}", node=node, port=80)
        if ms is not None:
            srv.sim.set_coordinate(node, rtt=ms / 1000)

    async def body():
        cfg = agent_config(srv.url, query=ConsulQuery(near="_agent"))
        async with watching(cfg) as (src, rec):
            def ranks():
                return {e.id: e.rank for e in rec.eps("web")}
            await until(lambda: ranks() == {"w1@n1": 1, "w2@n2": 0, "w3@n3": 2})
            # A new estimate alone wakes no query (Consul does not either); the next index
            # change brings the new order, and a re-sorted set is published though every
            # instance is the same.
            srv.sim.set_coordinate("n3", rtt=0.0001)
            updates = len(rec.updates)
            srv.sim.bump_index("web")
            await until(lambda: ranks() == {"w1@n1": 2, "w2@n2": 1, "w3@n3": 0})
            assert len(rec.updates) == updates + 1
        assert all("near=_agent" in q for _, p, q in srv.sim.get_log() if p == "/v1/health/service/web")
    run(body)


# --------------------------------------------------------------------------- issue 10: 7 and 12


def test_endless_body_is_cut_at_max_body_with_flat_memory(srv):
    from softlb_agent.consul_http import ConsulBodyTooLarge
    srv.sim.set_fault("endless", prefix="/v1/health/service/web")

    async def body():
        cfg = agent_config(srv.url, max_body=1 << 20)
        client = ConsulClient(consul_settings(cfg.consul))
        tracemalloc.start()
        try:
            for _ in range(3):
                with pytest.raises(ConsulBodyTooLarge, match="max_body"):
                    await client.health_service("web")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            await client.aclose()
        assert peak < 8 << 20  # a bounded buffer, not the ~230 MB/s it used to grow
    run(body)


def test_hostile_headers_are_bad_data_or_ignored_never_internal(srv):
    srv.sim.add_instance("web", id="a", port=80)

    async def body():
        async with watching(agent_config(srv.url)) as (src, rec):
            await until(lambda: rec.eps("web"))
            for index in ("²", "9" * 5000):
                srv.sim.set_fault("headers", count=1, headers={"X-Consul-Index": index})
                srv.sim.add_instance("web", id=f"x{len(index)}", port=81)
                await until(lambda: src.status.state == "degraded")
                assert src.status.detail.startswith("bad data"), src.status.detail
                await until(lambda: src.status.state == "ok")
            # A malformed optional header does not cost the answer.
            srv.sim.set_fault("headers", count=3, headers={"X-Consul-LastContact": "²",
                                                            "X-Consul-KnownLeader": "maybe"})
            srv.sim.add_instance("web", id="y", port=82)
            await until(lambda: any(e.port == 82 for e in rec.eps("web")))
            assert src.status.state == "ok" and not rec.stale("web")
    run(body)


def test_429_backs_off_at_least_retry_after(srv):
    srv.sim.add_instance("web", id="a", port=80)

    async def body():
        async with watching(agent_config(srv.url)) as (src, rec):
            await until(lambda: rec.eps("web"))
            srv.sim.reset_counts()
            srv.sim.set_fault("429", retry_after="1")
            srv.sim.add_instance("web", id="b", port=81)
            await trio.sleep(1.5)
            # Backoff policy 0.05..0.2 s would retry ~10 times; Retry-After: 1 allows ~2.
            assert srv.sim.get_counts()["/v1/health/service/web"] <= 3
            srv.sim.clear_faults()
            await until(lambda: len(rec.eps("web")) == 2, timeout=5)
    run(body)


# --------------------------------------------------------------------------- 7. the change feed


@pytest.mark.parametrize("feed", ["catalog_health", "health_state"])
def test_change_feed_brings_polled_changes_within_a_second(srv, feed):
    names = [f"s{i}" for i in range(30)]
    for n in names:
        srv.sim.add_instance(n, id=f"{n}-1", port=80)

    async def body():
        # 2 blocking watches, 28 polled; the round robin alone would take 28 x 0.5 s.
        cfg = agent_config(srv.url, services=names, max_watches=2, change_feed=feed, wait=5.0)
        async with watching(cfg, max_poll_rate=2.0) as (src, rec):
            await until(lambda: all(rec.eps(n) for n in names), timeout=10)
            await trio.sleep(0.5)
            for target in ("s17", "s29", "s5"):
                t0 = trio.current_time()
                srv.sim.set_check(f"{target}-1", "critical")
                await until(lambda: rec.eps(target)[0].weight == 0, timeout=1.5)
                assert trio.current_time() - t0 < 1.5
                srv.sim.add_instance(target, id=f"{target}-2", port=81)  # a new instance
                await until(lambda: len(rec.eps(target)) == 2, timeout=1.5)
            # At rest: the poller slowed to the safety rate (<= 1/s), blocking watches and
            # feeds idle in their waits.
            srv.sim.reset_counts()
            await trio.sleep(3)
            total = sum(srv.sim.get_counts().values())
            assert total <= 3 * 1 + 2 + 2 + 2, srv.sim.get_counts()
            assert src.requests["feed"] >= 1
        feed_queries = [q for _, p, q in srv.sim.get_log() if p == "/v1/health/state/any"]
        if feed == "catalog_health":  # only our polled services' checks, and node checks
            assert feed_queries and all("filter=" in q for q in feed_queries)
    run(body)


def test_a_failing_feed_falls_back_to_the_round_robin(srv):
    names = [f"s{i}" for i in range(6)]
    for n in names:
        srv.sim.add_instance(n, id=f"{n}-1", port=80)

    async def body():
        srv.sim.set_fault("500", prefix="/v1/health/state/")
        cfg = agent_config(srv.url, services=names, max_watches=1, change_feed="health_state")
        async with watching(cfg, poll_period=0.5) as (src, rec):
            await until(lambda: all(rec.eps(n) for n in names), timeout=10)
            srv.sim.update_instance("s4-1", port=99)  # seen by the poll, feed or not
            await until(lambda: rec.eps("s4")[0].port == 99, timeout=3)
            assert src.planner.poll_period == 0.5
            srv.sim.clear_faults()
            await until(lambda: src.planner.poll_period > 0.5, timeout=5)  # feed back: slow poll
    run(body)
