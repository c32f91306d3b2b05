"""The Consul watcher against the Consul API test server, over real loopback sockets."""

from __future__ import annotations

import pytest
import trio

from softlb._config import ServiceConfig
from softlb._types import RegistryHealth
from softlb_agent.consul_http import ConsulClient, consul_settings
from tests.consulsim import SimServer
from tests.consulsim.testing import agent_config, run, until, watching


@pytest.fixture
def srv():
    with SimServer() as s:
        yield s


def test_propagation_critical_and_node_address(srv):
    srv.sim.add_instance("web", id="a", address="10.0.0.1", port=80)

    async def body():
        async with watching(agent_config(srv.url)) as (src, rec):
            await until(lambda: [e.id for e in rec.eps("web")] == ["a@node-1"])
            # Added instance (empty Service.Address -> the node's address) shows up within 1 s.
            srv.sim.add_node("node-2", "192.0.2.7")
            srv.sim.add_instance("web", id="b", node="node-2", port=81)
            await until(lambda: len(rec.eps("web")) == 2, timeout=1.0)
            b = rec.eps("web")[1]
            assert (b.id, b.address, b.port) == ("b@node-2", "192.0.2.7", 81)
            # Critical: published with its registry state so the balancer drops it.
            srv.sim.set_check("a", "critical")
            await until(lambda: rec.eps("web")[0].registry is RegistryHealth.CRITICAL, timeout=1.0)
            srv.sim.set_node("node-2", health="critical")  # node-level serfHealth
            await until(lambda: rec.eps("web")[1].registry is RegistryHealth.CRITICAL, timeout=1.0)
            assert not any(stale for _, _, stale in rec.updates)
    run(body)


def test_at_rest_one_request_per_wait_and_no_republish(srv):
    srv.sim.add_instance("web", id="a", port=80)

    async def body():
        async with watching(agent_config(srv.url, wait=1.0)) as (src, rec):
            await until(lambda: rec.eps("web"))
            srv.sim.reset_counts()
            t0 = trio.current_time()
            srv.sim.bump_index("web")  # a no-op write: new index, same data
            await trio.sleep(3.2)
            elapsed = trio.current_time() - t0
            count = srv.sim.get_counts()["/v1/health/service/web"]
            # one per wait period (1 s + jitter), plus the one the no-op write woke
            assert count <= elapsed / 1.0 + 2
            assert len(rec.updates) == 1
    run(body)


def test_index_backwards_resets_and_keeps_following(srv):
    srv.sim.add_instance("web", id="a", port=80)

    async def body():
        async with watching(agent_config(srv.url)) as (src, rec):
            await until(lambda: rec.eps("web"))
            srv.sim.reset_counts()
            srv.sim.set_index(3)  # snapshot restore: the index goes backwards
            await until(lambda: any("index=" not in q for _, p, q in srv.sim.get_log()))
            srv.sim.add_instance("web", id="b", port=81)
            await until(lambda: len(rec.eps("web")) == 2, timeout=1.0)
    run(body)


def test_500s_keep_last_good_bounded_and_recover(srv):
    srv.sim.add_instance("web", id="a", port=80)

    async def body():
        async with watching(agent_config(srv.url)) as (src, rec):
            await until(lambda: rec.eps("web"))
            srv.sim.reset_counts()
            srv.sim.bump_index("web")  # the next query happens at once, into the fault
            srv.sim.set_fault("500")
            await until(lambda: rec.stale("web"))
            assert [e.id for e in rec.eps("web")] == ["a@node-1"]
            assert src.status.state == "degraded" and "http 500" in src.status.detail
            await trio.sleep(2.0)
            failures = srv.sim.get_counts()["/v1/health/service/web"]
            # Backoff 0.05 s doubling to 0.2 s, drawn from [d/2, d]: over ~2 s at most
            # 1 + 2.0/0.025... is the hot-loop bound; the policy gives far fewer.
            assert 3 <= failures <= 1 + 4 + int(2.0 / 0.1) + 1
            srv.sim.clear_faults()
            await until(lambda: not rec.stale("web"))
            assert src.status.state == "ok"
            # Announced once per state change, not per retry.
            assert [s.state for s in rec.statuses] == ["ok", "degraded", "ok"]
    run(body)


@pytest.mark.parametrize("mode", ["garbage", "drop"])
def test_garbage_and_dropped_connections_keep_last_good(srv, mode):
    srv.sim.add_instance("web", id="a", port=80)

    async def body():
        async with watching(agent_config(srv.url)) as (src, rec):
            await until(lambda: rec.eps("web"))
            srv.sim.set_fault(mode)
            srv.sim.bump_index("web")
            await until(lambda: rec.stale("web"))
            assert rec.eps("web")[0].id == "a@node-1"
            expected = "bad data" if mode == "garbage" else "unreachable"
            assert src.status.detail.startswith(expected)
            srv.sim.clear_faults()
            srv.sim.add_instance("web", id="b", port=81)
            await until(lambda: len(rec.eps("web")) == 2 and not rec.stale("web"))
    run(body)


def test_server_killed_keeps_last_good_with_bounded_retries():
    srv = SimServer().start()
    srv.sim.add_instance("web", id="a", port=80)
    calls = []

    class CountingClient(ConsulClient):
        async def health_service(self, *a, **kw):
            calls.append(trio.current_time())
            return await super().health_service(*a, **kw)

    async def body():
        cfg = agent_config(srv.url)
        client = CountingClient(consul_settings(cfg.consul))
        try:
            async with watching(cfg, client=client) as (src, rec):
                await until(lambda: rec.eps("web"))
                srv.stop()
                await until(lambda: rec.stale("web"))
                assert rec.eps("web")[0].id == "a@node-1"
                assert src.status.state == "degraded" and "unreachable" in src.status.detail
                calls.clear()
                await trio.sleep(2.0)
                # Capped backoff (0.2 s, jitter down to 0.1 s): bounded, not a hot loop.
                assert len(calls) <= 2.0 / 0.1 + 1
                fetched_at = rec.current["web"][2]
                assert fetched_at is not None and fetched_at < trio.current_time() - 2.0
        finally:
            await client.aclose()
    try:
        run(body)
    finally:
        srv.stop()


def test_acl_denied_is_an_operator_error_and_token_file_is_reread(srv, tmp_path, monkeypatch):
    srv.sim.add_instance("web", id="a", port=80)
    srv.sim.set_acl("right")
    token_file = tmp_path / "token"
    token_file.write_text("wrong\n")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN_FILE", str(token_file))
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)

    async def body():
        async with watching(agent_config(srv.url)) as (src, rec):
            await until(lambda: src.status.state == "acl_denied")
            assert "ACL not found" in src.status.detail
            assert "web" not in rec.current  # an error, not a silently empty catalog
            token_file.write_text("right\n")
            await until(lambda: rec.eps("web"))
            assert src.status.state == "ok"
    run(body)


def test_empty_answer_holds_previous_set_then_accepts(srv):
    srv.sim.add_instance("web", id="a", port=80)

    async def body():
        async with watching(agent_config(srv.url, keep_previous_on_empty=1.5)) as (src, rec):
            await until(lambda: rec.eps("web"))
            srv.sim.remove_instance("a")
            await until(lambda: rec.stale("web"))
            assert rec.eps("web")[0].id == "a@node-1"  # held, and said to be stale
            await until(lambda: rec.current["web"][0] == (), timeout=4)
            assert not rec.stale("web")
    run(body)


def test_tags_and_tagged_address(srv):
    srv.sim.add_instance("web", id="a", port=80, tags=["v2", "canary"],
                         tagged={"wan": {"Address": "198.51.100.1", "Port": 443}})
    srv.sim.add_instance("web", id="b", port=80, tags=["v1"])

    async def body():
        cfg = agent_config(srv.url, tagged_address="wan")
        cfg = cfg.__class__(**{**cfg.__dict__, "services": {"web": ServiceConfig(tags=("v2",))}})
        async with watching(cfg) as (src, rec):
            await until(lambda: rec.eps("web"))
            (a,) = rec.eps("web")
            assert (a.id, a.address, a.port) == ("a@node-1", "198.51.100.1", 443)
    run(body)


def test_on_demand_first_answer_overflow_polling_and_idle_expiry(srv):
    for s in ("web", "db", "cache"):
        srv.sim.add_instance(s, id=f"{s}-1", port=1)

    async def body():
        cfg = agent_config(srv.url, max_watches=1, idle_timeout=1.0)
        async with watching(cfg, poll_period=0.3) as (src, rec):
            await until(lambda: rec.eps("web"))
            # First resolve of an unwatched service waits for Consul's first answer.
            assert await src.wait_ready("db", timeout=2.0)
            assert rec.eps("db")[0].id == "db-1@node-1"
            assert src.planner.blocking == ("web",) and src.planner.polled == ("db",)
            log = srv.sim.get_log()
            assert any(p == "/v1/health/service/db" and "cached" in q for _, p, q in log)
            # Polled services still follow changes (within a poll period).
            srv.sim.add_instance("db", id="db-2", port=2)
            await until(lambda: len(rec.eps("db")) == 2, timeout=2.0)
            # Unknown service: the first answer is "no instances", not a timeout.
            assert await src.wait_ready("nope", timeout=2.0)
            assert rec.eps("nope") == ()
            # Idle on-demand services are dropped; the configured one stays.
            await until(lambda: set(rec.removed) == {"db", "nope"}, timeout=4)
            assert src.planner.wanted == ("web",)
            srv.sim.reset_counts()
            await trio.sleep(0.8)
            assert "/v1/health/service/db" not in srv.sim.get_counts()
    run(body)


def test_first_answer_wait_is_bounded_when_consul_is_down():
    srv = SimServer().start()
    url = srv.url
    srv.stop()

    async def body():
        async with watching(agent_config(url, services=())) as (src, rec):
            t0 = trio.current_time()
            assert not await src.wait_ready("web", timeout=1.0)
            assert trio.current_time() - t0 < 1.5
    run(body)


def test_stalled_query_is_cancellable(srv):
    srv.sim.add_instance("web", id="a", port=80)

    async def body():
        async with watching(agent_config(srv.url, wait=60.0)) as (src, rec):
            await until(lambda: rec.eps("web"))
            srv.sim.set_fault("stall")
            srv.sim.bump_index("web")
            await trio.sleep(0.3)
            assert "web" in src._scopes  # still waiting inside the stalled request
        # Leaving the block cancelled it: at once, not after the 60 s wait.
    run(body, timeout=5)
    srv.sim.clear_faults()


def test_reconfigure_tags_refetches(srv):
    srv.sim.add_instance("web", id="a", port=80, tags=["x"])
    srv.sim.add_instance("web", id="b", port=80)

    async def body():
        cfg = agent_config(srv.url)
        async with watching(cfg) as (src, rec):
            await until(lambda: len(rec.eps("web")) == 2)
            src.reconfigure(cfg.__class__(**{**cfg.__dict__, "services": {"web": ServiceConfig(tags=("x",))}}))
            await until(lambda: len(rec.eps("web")) == 1)
    run(body)


@pytest.mark.parametrize("env, expect", [
    ({}, ("http://127.0.0.1:8500", "")),
    ({"CONSUL_HTTP_ADDR": "10.0.0.1:8501", "CONSUL_HTTP_SSL": "true", "CONSUL_HTTP_TOKEN": "t"},
     ("https://10.0.0.1:8501", "t")),
    ({"CONSUL_HTTP_ADDR": "http://c:1"}, ("http://c:1", "")),
])
def test_settings_from_environment(env, expect):
    from softlb._config import ConsulConfig
    s = consul_settings(ConsulConfig(), env)
    assert (s.base_url, s.token) == expect


def test_settings_config_wins_and_token_file(tmp_path):
    from softlb._config import ConsulConfig
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    s = consul_settings(ConsulConfig(address="127.0.0.1:1", token="cfg"),
                        {"CONSUL_HTTP_ADDR": "x:2", "CONSUL_HTTP_TOKEN": "env"})
    assert (s.base_url, s.token) == ("http://127.0.0.1:1", "cfg")
    s = consul_settings(ConsulConfig(), {"CONSUL_HTTP_TOKEN_FILE": str(f), "CONSUL_CACERT": "/ca.pem"})
    assert (s.token, s.token_file, s.verify) == ("from-file", str(f), "/ca.pem")


def test_last_used_keeps_on_demand_service_alive(srv):
    srv.sim.add_instance("db", id="d", port=1)

    async def body():
        used: dict[str, float] = {}
        async with watching(agent_config(srv.url, services=(), idle_timeout=0.5)) as (src, rec):
            src.last_used = used.get
            assert await src.wait_ready("db", timeout=2.0)
            # Resolves recorded elsewhere (the engine) keep it watched past idle_timeout...
            for _ in range(8):
                used["db"] = trio.current_time()
                await trio.sleep(0.1)
            assert src.planner.wanted == ("db",) and not rec.removed
            # ...and it goes once they stop.
            await until(lambda: rec.removed == ["db"], timeout=3)
    run(body)
