"""The Consul watcher against the Consul API test server, over real loopback sockets."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import pytest
import trio

from softlb._config import ServiceConfig
from softlb._types import RegistryHealth
from softlb_agent.consul_http import ConsulClient, ConsulUnreachable, consul_settings
from softlb_agent.consul_watch import WatchRefused
from tests.consulsim import SimServer
from tests.consulsim.testing import Recorder, agent_config, run, until, watching


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
            # Generous wait: the 1 s propagation bound is test_propagation_*'s; this is the reset.
            await until(lambda: len(rec.eps("web")) == 2)
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
            await until(lambda: rec.current["web"][0] == (), timeout=10)
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
            assert await src.wait_ready("db", timeout=10)
            assert rec.eps("db")[0].id == "db-1@node-1"
            assert src.planner.blocking == ("web",) and src.planner.polled == ("db",)
            log = srv.sim.get_log()
            assert any(p == "/v1/health/service/db" and "cached" in q for _, p, q in log)
            # Polled services still follow changes (within a poll period).
            srv.sim.add_instance("db", id="db-2", port=2)
            await until(lambda: len(rec.eps("db")) == 2, timeout=10)
            # A name Consul does not know: not a timeout, not published (so never in the
            # snapshot), no slot held; refused from the negative cache from then on.
            # Refused from the catalog feed's list once it has been quiet a moment (no query
            # then), or asked about once; either way never published, never held.
            try:
                assert not await src.wait_ready("nope", timeout=10)
            except WatchRefused as e:
                assert e.unknown
            assert "nope" not in rec.current and not src.planner.is_wanted("nope")
            with pytest.raises(WatchRefused, match="does not know"):
                src.want("nope")
            assert src.negative.refused >= 1
            assert srv.sim.get_counts().get("/v1/health/service/nope", 0) <= 1
            # Idle on-demand services are dropped; the configured one stays.
            await until(lambda: set(rec.removed) == {"db"}, timeout=10)
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
            # Bounded (fail_after), not timed: refused connections end the wait, as does
            # the timeout; either way it must not hang on a Consul that is gone.
            with trio.fail_after(10):
                assert not await src.wait_ready("web", timeout=1.0)
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
        # Leaving the block cancelled it: well within the run bound, not after the 60 s wait.
    run(body, timeout=20)
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
            assert await src.wait_ready("db", timeout=10)
            # Resolves recorded elsewhere (the engine) keep it watched past idle_timeout...
            for _ in range(8):
                used["db"] = trio.current_time()
                await trio.sleep(0.1)
            assert src.planner.wanted == ("db",) and not rec.removed
            # ...and it goes once they stop.
            await until(lambda: rec.removed == ["db"], timeout=10)
    run(body)


@pytest.mark.parametrize("bad", ["deep nesting", "huge weight", "bad host name"])
def test_bad_data_keeps_last_good_and_names_the_problem(srv, bad):
    srv.sim.add_instance("web", id="a", port=80)

    async def body():
        async with watching(agent_config(srv.url)) as (src, rec):
            await until(lambda: rec.eps("web"))
            if bad == "deep nesting":  # json.loads raised RecursionError, ending the source
                srv.sim.set_fault("garbage", body="[" * 200000)
                expected = "nested too deeply"
            elif bad == "huge weight":  # accepted, then OverflowError when packed for the wire
                srv.sim.update_instance("a", weights={"Passing": 2**70, "Warning": 1})
                expected = "Service.Weights.Passing: 1180591620717411303424 is out of range"
            else:
                srv.sim.update_instance("a", address="db..internal")
                expected = "address 'db..internal'"
            # Bumped until an answer carries a new index (garbage with the index the source
            # already has is rightly taken as "no change").
            await until(lambda: srv.sim.bump_index("web") and rec.stale("web"))
            assert [(e.id, e.port, e.weight) for e in rec.eps("web")] == [("a@node-1", 80, 1)]
            assert src.status.state == "degraded" and expected in src.status.detail
            srv.sim.clear_faults()
            srv.sim.update_instance("a", weights={"Passing": 5, "Warning": 1}, address="")
            await until(lambda: rec.eps("web")[0].weight == 5 and not rec.stale("web"))
            assert src.status.state == "ok"
    run(body)


@dataclass
class RefusingRecorder(Recorder):
    """Raises on sets with an endpoint on port 666, like an Engine choking on data nobody
    foresaw: the last-resort path, as opposed to the errors the source expects."""

    refused: Counter[str] = field(default_factory=Counter)

    def on_update(self, service, endpoints, now, *, stale, fetched_at):
        if any(e.port == 666 for e in endpoints):
            self.refused[service] += 1
            raise OverflowError("int too big to convert")
        super().on_update(service, endpoints, now, stale=stale, fetched_at=fetched_at)


def test_unexpected_errors_keep_last_good_and_log_once_with_traceback(srv, caplog):
    srv.sim.add_instance("web", id="w", port=80)
    srv.sim.add_instance("db", id="d", port=81)

    async def body():
        # web gets the blocking watch, db the poller: both loops must survive.
        # change_feed off: port-only changes are not in the check feed, and this test
        # needs the poller to see them at once.
        cfg = agent_config(srv.url, services=("web", "db"), max_watches=1, change_feed="off")
        async with watching(cfg, RefusingRecorder(), poll_period=0.1) as (src, rec):
            await until(lambda: rec.eps("web") and rec.eps("db"))
            assert src.planner.blocking == ("web",) and src.planner.polled == ("db",)
            srv.sim.update_instance("w", port=666)
            srv.sim.update_instance("d", port=666)
            await until(lambda: rec.refused["web"] >= 3 and rec.refused["db"] >= 3)
            assert [e.port for e in rec.eps("web")] == [80] and rec.stale("web")
            assert [e.port for e in rec.eps("db")] == [81] and rec.stale("db")
            assert src.status.state == "degraded" and src.status.detail.startswith("internal error")
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            # Once per service entering the state, not once per retry; with the traceback.
            assert sorted(r.args[0] for r in errors) == ["db", "web"]
            assert all(r.exc_info and r.exc_info[0] is OverflowError for r in errors)
            srv.sim.update_instance("w", port=82)
            srv.sim.update_instance("d", port=83)
            await until(lambda: [e.port for e in rec.eps("web")] == [82] and not rec.stale("web"))
            await until(lambda: [e.port for e in rec.eps("db")] == [83] and not rec.stale("db"))
            assert src.status.state == "ok"
    run(body)


class HeldClient(ConsulClient):
    """Holds the answer (or failure) of the first query for service "b" until `release`:
    Consul answering slowly, long enough for b to idle out meanwhile."""

    def __init__(self, *a, fail: bool, **kw):
        super().__init__(*a, **kw)
        self.fail = fail
        self.release = trio.Event()
        self.held = self.returned = 0

    async def health_service(self, service, **kw):
        ans = await super().health_service(service, **kw)
        if service == "b" and not self.release.is_set():
            self.held += 1
            await self.release.wait()
            self.returned += 1
            if self.fail:
                raise ConsulUnreachable("ReadError: connection reset")
        return ans


@pytest.mark.parametrize("late", ["answer", "failure"])
def test_late_result_for_a_service_that_idled_out_is_dropped(srv, late):
    srv.sim.add_instance("web", id="w", port=80)
    srv.sim.add_instance("b", id="b", port=81)

    async def body():
        cfg = agent_config(srv.url, max_watches=1, idle_timeout=0.3)
        client = HeldClient(consul_settings(cfg.consul), fail=late == "failure")
        try:
            async with watching(cfg, client=client) as (src, rec):
                await until(lambda: rec.eps("web"))
                assert not await src.wait_ready("b", timeout=0.1)  # its first poll is held
                await until(lambda: client.held == 1)
                # Idled out (never published, so the listener has nothing to remove).
                await until(lambda: not src.planner.is_wanted("b"))
                assert client.held == 1 and rec.removed == []
                client.release.set()
                await until(lambda: client.returned == 1)
                await trio.sleep(0.1)
                # Published, the late answer would bring b back with nothing watching it:
                # frozen forever as "fresh". A late failure would leave the source degraded.
                assert "b" not in rec.current and "b" not in src._states
                assert [s.state for s in rec.statuses] == ["ok"]
        finally:
            await client.aclose()
    run(body)


def test_service_names_are_checked_and_encoded_into_the_url(srv):
    srv.sim.add_instance("web", id="a", port=80)

    async def body():
        cfg = agent_config(srv.url, services=(), stale=False)
        async with watching(cfg) as (src, rec):
            for name in ("web?dc=other", "web#frag", "x/../web", "..", ""):
                with pytest.raises(WatchRefused, match="not a Consul service name") as e:
                    src.want(name)
                assert not e.value.retryable
            assert src.planner.wanted == ()
        # Names reaching the client some other way (config) cannot alias another service.
        client = ConsulClient(consul_settings(cfg.consul))
        try:
            ans = await client.health_service("x/../web?dc=other#f")
        finally:
            await client.aclose()
        assert ans.body == b"[]"  # a service of that odd name, not web
        assert ("/v1/health/service/x%2F..%2Fweb%3Fdc%3Dother%23f", "") in [
            (p, q) for _, p, q in srv.sim.get_log()]
    run(body)


def test_without_a_feed_an_unknown_name_is_asked_once_then_refused(srv):
    srv.sim.add_instance("web", id="w", port=80)

    async def body():
        cfg = agent_config(srv.url, change_feed="off", negative_ttl=0.5)
        async with watching(cfg) as (src, rec):
            await until(lambda: rec.eps("web"))
            assert not await src.wait_ready("nope", timeout=10)  # Consul answered []
            assert "nope" not in rec.current and not src.planner.is_wanted("nope")
            assert src.planner.on_demand_count == 0
            for _ in range(5):
                with pytest.raises(WatchRefused, match="does not know") as e:
                    src.want("nope")
                assert e.value.unknown
            assert srv.sim.get_counts()["/v1/health/service/nope"] == 1
            # It exists now: once the negative entry expires, it is served.
            srv.sim.add_instance("nope", id="n", port=81)
            await trio.sleep(0.6)
            assert await src.wait_ready("nope", timeout=10)
            assert [e.port for e in rec.eps("nope")] == [81]
    run(body)


def test_made_up_names_do_not_hold_on_demand_slots(srv):
    srv.sim.add_instance("web", id="w", port=80)
    srv.sim.add_instance("real", id="r", port=81)

    async def body():
        cfg = agent_config(srv.url, change_feed="off", max_on_demand=2)
        async with watching(cfg) as (src, rec):
            for i in range(10):
                assert not await src.wait_ready(f"typo-{i}", timeout=10)
            assert src.planner.on_demand_count == 0 and len(src.negative) == 10
            assert await src.wait_ready("real", timeout=10)
    run(body)


def test_a_service_registered_a_moment_ago_is_not_refused(srv):
    srv.sim.add_instance("web", id="w", port=80)

    async def body():
        async with watching(agent_config(srv.url, wait=5.0)) as (src, rec):
            await until(lambda: rec.eps("web"))
            await trio.sleep(1.0)  # the catalog feed is settled: unknown names are refused
            with pytest.raises(WatchRefused, match="does not know"):
                src.want("made-up")
            # Registered now and resolved at once: refused at most until the catalog feed's
            # next answer lists it (not for negative_ttl), then served.
            srv.sim.add_instance("fresh", id="f", port=81)
            t0 = trio.current_time()
            while True:
                try:
                    src.want("fresh")
                    break
                except WatchRefused:
                    assert trio.current_time() - t0 < 1.0
                    await trio.sleep(0.01)
            assert await src.wait_ready("fresh", timeout=5)
            assert [e.port for e in rec.eps("fresh")] == [81]
    run(body)
