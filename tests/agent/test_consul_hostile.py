"""A real agent following Consul (the API test server, in a subprocess) against bad data,
callers inventing service names, names that would rewrite the query URL, watchers of
on-demand services, and a damaged snapshot: it keeps running and keeps answering."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager

import pytest
import trio

from agentproc import AgentProcess, refusing_port, wait_until
from helpers.frames import frame, read_frames
from softlb import AgentConfig, Endpoint
from softlb._config import ConsulConfig
from softlb_agent import catalog_snapshot
from softlb_agent.runtime import Runtime
from softlb_client import SoftLBError
from tests.consulsim import SimProcess


def consul_agent(tmp_path, url, **consul):
    settings = {"wait": '"2s"', "min_query_interval": '"20ms"', "first_answer_timeout": '"3s"',
                "keep_previous_on_empty": '"0s"', **consul}
    config = (f'[agent]\nstate_dir = "{tmp_path}/state"\n[consul]\n'
              + "".join(f"{k} = {v}\n" for k, v in settings.items()) + "[services.web]\n")
    return AgentProcess(str(tmp_path), "", config, extra_args=["--consul", url])


@contextmanager
def consul_with_agent(tmp_path, **consul):
    """The API test server with web (a@node-1 at 10.0.0.1:80), and an agent following it;
    both stopped by pid on the way out."""
    with SimProcess() as sim:
        sim.control.add_instance(service="web", id="a", address="10.0.0.1", port=80)
        agent = consul_agent(tmp_path, sim.url, **consul)
        try:
            agent.start()
            yield sim.control, agent
        finally:
            agent.stop()


def test_bad_consul_answers_do_not_end_the_agent(tmp_path):
    with consul_with_agent(tmp_path) as (ctl, agent), agent.client(timeout=5) as c:
        assert c.resolve("web", lease=False).port == 80

        def fresh():
            return not c.resolve("web", lease=False).stale
        # Each of these used to raise out of the watch (RecursionError; OverflowError when
        # packing the weight; the host name choked the prober) and end the agent.
        ctl.set_fault(mode="garbage", body="[" * 200000)
        # Bumped until a garbage answer carries a new index (one with the index the agent
        # already has is rightly taken as "no change").
        wait_until(lambda: ctl.bump_index(service="web") and not fresh(), timeout=10)
        ctl.clear_faults()
        ctl.bump_index(service="web")
        wait_until(fresh, timeout=20)  # after the agent's backoff
        for bad, good in (({"weights": {"Passing": 2**70, "Warning": 1}},
                           {"weights": {"Passing": 1, "Warning": 1}}),
                          ({"address": "db..internal"}, {"address": "10.0.0.1"})):
            ctl.reset_counts()
            ctl.update_instance(id="a", **bad)
            # Stale, and a query after the bad answer: the agent lived through it.
            wait_until(lambda: not fresh() and ctl.get_counts().get("/v1/health/service/web"),
                       timeout=20)
            assert agent.proc.poll() is None
            r = c.resolve("web", lease=False)
            assert (r.address, r.port, r.weight) == ("10.0.0.1", 80, 1)
            ctl.update_instance(id="a", **good)
            wait_until(fresh, timeout=20)
        assert "nested too deeply" in agent.log()  # the status warning named the problem


@pytest.mark.parametrize("feed", ["catalog_health", "health_state"])
def test_made_up_names_never_crowd_out_a_real_new_service(tmp_path, feed):
    n, cap = 3000, 20
    with consul_with_agent(tmp_path, max_on_demand=cap, first_answer_timeout='"1s"',
                           change_feed=f'"{feed}"') as (ctl, agent):
        # The catalog feed's "no such service" is trusted once its list has been quiet for
        # 0.5 s (a service registered a moment ago must not be refused): not at start-up.
        time.sleep(1.0)
        flood = socket.socket(socket.AF_UNIX)
        flood.settimeout(30)
        flood.connect(agent.socket)
        answers: list = []
        reader = threading.Thread(target=lambda: answers.extend(read_frames(flood, n)), daemon=True)
        reader.start()
        # Every name a new one: each used to take an on-demand slot (and be saved in the
        # snapshot), so that a real service deployed afterwards was refused UNAVAILABLE.
        flood.sendall(b"".join(frame({"id": i, "op": "resolve", "service": f"typo-{i}", "lease": False})
                               for i in range(n)))
        with agent.client(timeout=10) as c:
            answered = sum(c.resolve("web", lease=False).port == 80 for _ in range(20))
        assert answered == 20
        reader.join(timeout=30)
        flood.close()
        assert len(answers) == n
        codes = Counter(a["error"]["code"] for a in answers if "error" in a)
        assert not any("max_on_demand" in a["error"]["message"] for a in answers if "error" in a)
        typo_queries = sum(v for k, v in ctl.get_counts().items() if "/typo-" in k)
        if feed == "catalog_health":
            # The catalog lists every service: unknown names are refused without a query.
            assert codes["UNKNOWN_SERVICE"] >= n - 64, codes
            assert typo_queries <= 64
        else:
            # The check feed does not list check-less services, so a name outside it is
            # asked about, a bounded number at a time; the rest wait their turn.
            assert set(codes) <= {"UNKNOWN_SERVICE", "UNAVAILABLE"}
            assert typo_queries <= n
        # A real service deployed now is served, whatever the flood left behind.
        ctl.add_instance(service="brand-new", id="n", address="10.0.0.9", port=90)
        with agent.client(timeout=10) as c:
            def served():
                try:
                    return c.resolve("brand-new", lease=False).port == 90
                except SoftLBError:
                    return False
            wait_until(served, timeout=10)
            watched = {s["name"] for s in c.services()}
        assert watched == {"web", "brand-new"}
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.admin_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        refused = [ln for ln in metrics.splitlines() if ln.startswith("softlb_consul_unknown_names_total ")]
        assert refused and float(refused[0].split()[1]) >= codes["UNKNOWN_SERVICE"] - 64
        agent.stop()
        saved = json.loads((tmp_path / "state" / catalog_snapshot.FILENAME).read_text())
        assert set(saved["services"]) == {"web", "brand-new"}


def test_a_watched_on_demand_service_stays_until_its_watchers_leave(tmp_path):
    with consul_with_agent(tmp_path, idle_timeout='"500ms"') as (ctl, agent), \
            agent.client(timeout=10) as c:
        ctl.add_instance(service="b", id="b1", address="10.0.0.2", port=81)
        # The catalog list may still be on its way from Consul (docs/CONSUL.md: the answer
        # in flight): what this test is about starts once the agent knows b.
        wait_until(lambda: _resolves(c, "b"), timeout=10)
        updates = c.watch("b", timeout=10)
        assert [e["id"] for e in next(updates)["endpoints"]] == ["b1@node-1"]
        time.sleep(2.0)  # four idle timeouts without a resolve of b
        ctl.add_instance(service="b", id="b2", address="10.0.0.3", port=82)
        # The next thing the watcher hears is Consul's change, not a false "removed".
        update = next(updates)
        assert not update.get("removed")
        assert sorted(e["id"] for e in update["endpoints"]) == ["b1@node-1", "b2@node-1"]
        updates.close()
        # Once the last watcher has left, b idles out as usual.
        wait_until(lambda: "b" not in {s["name"] for s in c.services()}, timeout=15)


def test_names_that_would_rewrite_the_consul_url_are_refused(tmp_path):
    with consul_with_agent(tmp_path) as (ctl, agent):
        with agent.client(timeout=5) as c:
            for name in ["web?dc=other", "web#frag", "x/../web", "web/../db"]:
                with pytest.raises(SoftLBError) as e:
                    c.resolve(name, lease=False)
                assert e.value.code == "BAD_ARGUMENT" and "not a Consul service name" in e.value.message
                with pytest.raises(SoftLBError) as e:
                    next(c.watch(name, timeout=5))
                assert e.value.code == "BAD_ARGUMENT"
            assert {s["name"] for s in c.services()} == {"web"}
        asked = {p for _, p, _ in ctl.get_log() if p.startswith("/v1/health/service/")}
        assert asked == {"/v1/health/service/web"}


def test_unknown_names_leave_no_wait_events_behind():
    async def main():
        rt = Runtime(AgentConfig(source="consul", consul=ConsulConfig(first_answer_timeout=0.01)))
        with trio.fail_after(10):
            for i in range(50):  # Consul unreachable: every wait times out
                assert not await rt.wait_for_service(f"typo-{i}")
            assert rt._events == {}
            # A waiter still waiting keeps its event, and is still woken by the service.
            got = []

            async def long_wait():
                got.append(await rt.wait_for_service("db", timeout=10))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_wait)
                await trio.sleep(0.05)
                assert not await rt.wait_for_service("db", timeout=0.01)
                assert "db" in rt._events
                rt.dispatch(rt.engine.set_service("db", [Endpoint(id="d", address="10.0.0.5", port=5)],
                                                  trio.current_time()))
            assert got == [True] and rt._events == {}
    trio.run(main)


@pytest.mark.parametrize("damage", ["duplicate ids", "deep nesting", "huge weight"])
def test_damaged_snapshot_does_not_stop_the_agent(tmp_path, damage):
    ep = {"id": "a@n1", "address": "10.0.0.1", "port": 80, "weight": 1}
    eps = [ep, {**ep, "id": "b@n1", "port": 82}]
    if damage == "duplicate ids":
        eps.insert(1, {**ep, "port": 81})
    elif damage == "huge weight":
        eps[1]["weight"] = 2**70
    doc = json.dumps({"version": 1, "saved_at": time.time(),
                      "services": {"web": {"fetched_at": time.time() - 5, "endpoints": eps}}})
    path = catalog_snapshot.snapshot_path(str(tmp_path / "state"))
    path.parent.mkdir(parents=True)
    path.write_text("[" * 200000 if damage == "deep nesting" else doc)
    # Consul is down: without the snapshot, web is simply unknown until it is back.
    agent = consul_agent(tmp_path, f"http://127.0.0.1:{refusing_port()}", first_answer_timeout='"200ms"')
    try:
        agent.start()
        with agent.client(timeout=5) as c:
            if damage == "duplicate ids":
                ports = {c.resolve("web", lease=False).port for _ in range(8)}
                assert ports == {80, 82}  # the first a@n1 kept, its duplicate dropped
                assert "keeping the first of each" in agent.log()
            else:
                with pytest.raises(SoftLBError):
                    c.resolve("web", lease=False)
                assert "ignored" in agent.log()
        assert agent.proc.poll() is None
    finally:
        agent.stop()


def test_endless_consul_answer_keeps_the_agent_memory_flat(tmp_path):
    psutil = pytest.importorskip("psutil")
    with consul_with_agent(tmp_path, max_body="1048576") as (ctl, agent), \
            agent.client(timeout=5) as c:
        assert c.resolve("web", lease=False).port == 80
        proc = psutil.Process(agent.proc.pid)
        ctl.set_fault(mode="endless", prefix="/v1/health/service/web")
        ctl.bump_index(service="web")
        wait_until(lambda: c.resolve("web", lease=False).stale, timeout=10)
        rss0 = proc.memory_info().rss
        time.sleep(3)  # it used to grow ~230 MB/s here
        grown = proc.memory_info().rss - rss0
        assert grown < 30 << 20, f"RSS grew {grown >> 20} MiB"
        assert c.resolve("web", lease=False).port == 80  # still serving the last good set
        ctl.clear_faults()
        ctl.bump_index(service="web")
        wait_until(lambda: not c.resolve("web", lease=False).stale, timeout=10)
    assert "answer too large" in agent.log()


def test_made_up_names_in_an_old_snapshot_do_not_fill_max_on_demand(tmp_path):
    # Snapshots written before the fix saved every made-up name as an empty service.
    path = catalog_snapshot.snapshot_path(str(tmp_path / "state"))
    web = Endpoint(id="a@node-1", address="10.0.0.1", port=80)
    catalog_snapshot.save(path, {"web": ((web,), 0.0), **{f"typo-{i}": ((), 0.0) for i in range(50)}},
                          now_mono=0.0, now_wall=time.time())
    with consul_with_agent(tmp_path, max_on_demand=5) as (ctl, agent), agent.client(timeout=5) as c:
        ctl.add_instance(service="real", id="r", address="10.0.0.2", port=81)
        assert c.resolve("real", lease=False).port == 81
        assert {s["name"] for s in c.services()} == {"web", "real"}


def test_a_name_consul_does_not_know_is_answered_without_waiting_out_the_timeout(tmp_path):
    # No change feed: the name is asked about; Consul's `[]` ends the caller's wait at once
    # (UNKNOWN_SERVICE), not after first_answer_timeout (5 s here).
    with consul_with_agent(tmp_path, change_feed='"off"', first_answer_timeout='"5s"') as (ctl, agent), \
            agent.client(timeout=10) as c:
        t0 = time.monotonic()
        with pytest.raises(SoftLBError, match="UNKNOWN_SERVICE"):
            c.resolve("nope", lease=False)
        assert time.monotonic() - t0 < 2.5
        with pytest.raises(SoftLBError, match="UNKNOWN_SERVICE"):  # then from the negative cache
            c.resolve("nope", lease=False)
        assert "internal error" not in agent.log()


def _resolves(c, service: str) -> bool:
    try:
        c.resolve(service, lease=False)
        return True
    except SoftLBError as e:
        if e.code != "UNKNOWN_SERVICE":
            raise
        return False
