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

from agentproc import AgentProcess, free_port, wait_until
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


def test_made_up_names_do_not_starve_other_clients(tmp_path):
    n, cap = 3000, 20
    with consul_with_agent(tmp_path, max_on_demand=cap, first_answer_timeout='"1s"') as (ctl, agent):
        flood = socket.socket(socket.AF_UNIX)
        flood.settimeout(20)
        flood.connect(agent.socket)
        answers: list = []
        reader = threading.Thread(target=lambda: answers.extend(read_frames(flood, n)), daemon=True)
        reader.start()
        # Every name a new one: each used to start a watch, and replanning them all took
        # O(n^3) time on the agent's only thread (about 70 s for 3000 names).
        flood.sendall(b"".join(frame({"id": i, "op": "resolve", "service": f"typo-{i}", "lease": False})
                               for i in range(n)))
        with agent.client(timeout=10) as c:
            answered = sum(c.resolve("web", lease=False).port == 80 for _ in range(20))
        assert answered == 20
        reader.join(timeout=30)
        flood.close()
        assert len(answers) == n
        codes = Counter((a["error"]["code"], "max_on_demand" in a["error"]["message"])
                        for a in answers if "error" in a)
        # Past the cap: UNAVAILABLE at once, saying why; the first `cap` names were watched.
        assert codes[("UNAVAILABLE", True)] == n - cap
        with agent.client(timeout=5) as c:
            watched = {s["name"] for s in c.services()} - {"web"}
        assert len(watched) <= cap


def test_a_watched_on_demand_service_stays_until_its_watchers_leave(tmp_path):
    with consul_with_agent(tmp_path, idle_timeout='"500ms"') as (ctl, agent), \
            agent.client(timeout=10) as c:
        ctl.add_instance(service="b", id="b1", address="10.0.0.2", port=81)
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
    agent = consul_agent(tmp_path, f"http://127.0.0.1:{free_port()}", first_answer_timeout='"200ms"')
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
