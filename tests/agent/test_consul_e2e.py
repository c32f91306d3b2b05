"""End to end: a real agent subprocess following the Consul API test server (a subprocess
too, so it can be killed), answering through its outage and across an agent restart."""

from __future__ import annotations

import signal
import socket

import pytest

from agentproc import AgentProcess, wait_until
from tests.consulsim import AGENT_NODE, SimProcess


def consul_agent(tmp_path, url, extra_config=""):
    config = f"""
[agent]
state_dir = "{tmp_path}/state"
[consul]
wait = "2s"
min_query_interval = "20ms"
first_answer_timeout = "3s"
keep_previous_on_empty = "0s"
[services.web]
{extra_config}
"""
    return AgentProcess(str(tmp_path), "", config, extra_args=["--consul", url])


def resolve_ids(client, service="web", n=12):
    return {client.resolve(service, lease=False).id for _ in range(n)}


def test_follows_consul_survives_outage_and_restarts_from_snapshot(tmp_path):
    sim = SimProcess()
    agent = None
    try:
        ctl = sim.control
        ctl.add_instance(service="web", id="a", address="10.0.0.1", port=80)
        agent = consul_agent(tmp_path, sim.url).start()
        with agent.client(timeout=5) as c:
            assert resolve_ids(c) == {"a@node-1"}
            # An added instance with no Service.Address answers at its node's address.
            ctl.add_node(name="node-2", address="192.0.2.9")
            ctl.add_instance(service="web", id="b", node="node-2", port=81)
            wait_until(lambda: resolve_ids(c) == {"a@node-1", "b@node-2"}, timeout=1.0, interval=0.01)
            b = next(r for r in (c.resolve("web", lease=False) for _ in range(4)) if r.id == "b@node-2")
            assert (b.address, b.port, b.stale) == ("192.0.2.9", 81, False)
            # Critical: never answered once the agent has seen the change.
            ctl.set_check(id="a", status="critical")
            wait_until(lambda: resolve_ids(c) == {"b@node-2"}, timeout=1.0, interval=0.01)
            assert resolve_ids(c, n=50) == {"b@node-2"}
            eps = {e["id"]: e for e in c.endpoints("web")["endpoints"]}
            assert (eps["a@node-1"]["registry"], eps["a@node-1"]["eligible"]) == ("critical", False)
            ctl.set_check(id="a", status="passing")
            wait_until(lambda: len(resolve_ids(c)) == 2, timeout=1.0, interval=0.01)
            # A service not in the config: the first resolve waits for Consul, then answers.
            ctl.add_instance(service="db", id="d", address="10.0.0.5", port=5432)
            assert c.resolve("db", lease=False).id == "d@node-1"

            # Consul dies: answers continue from the last good set, then say they are stale.
            sim.kill()
            assert resolve_ids(c) == {"a@node-1", "b@node-2"}
            r = wait_until(lambda: (lambda r: r if r.stale else None)(c.resolve("web", lease=False)),
                           timeout=10)
            assert r.age is not None and r.age >= 0
            assert c.endpoints("web")["stale"] is True
        assert agent.stop() == 0

        # Restart the agent with Consul still down: it answers from the snapshot, stale.
        agent = consul_agent(tmp_path, sim.url).start()
        with agent.client(timeout=5) as c:
            r = c.resolve("web", lease=False)
            assert r.stale and r.age is not None and r.age > 0
            assert resolve_ids(c) == {"a@node-1", "b@node-2"}
            assert c.resolve("db", lease=False).id == "d@node-1"
        assert "loaded 2 services from snapshot" in agent.log()
    finally:
        if agent is not None:
            agent.stop()
        sim.kill()


def test_provider_registration_lifecycle(tmp_path):
    served = socket.socket()
    served.bind(("127.0.0.1", 0))
    served.listen(8)
    port = served.getsockname()[1]
    sim = SimProcess()
    agent = None
    try:
        extra = f"""
[[provide]]
name = "api"
port = {port}
tags = ["v1"]
ttl = "3s"
"""
        agent = consul_agent(tmp_path, sim.url, extra).start()
        checks = lambda: {c["check_id"]: c for c in sim.control.dump()["checks"] if c["node"] == AGENT_NODE}
        wait_until(lambda: checks().get(f"softlb:api-{port}", {}).get("status") == "passing", timeout=5)
        assert agent.stop(signal.SIGTERM) == 0
        assert f"softlb:api-{port}" not in checks()
        assert not [i for i in sim.control.dump()["instances"] if i["service"] == "api"]
    finally:
        if agent is not None:
            agent.stop()
        sim.kill()
        served.close()


def test_acl_denied_is_visible_in_status(tmp_path):
    sim = SimProcess(acl_token="right")
    agent = None
    try:
        agent = consul_agent(tmp_path, sim.url).start()
        with agent.client(timeout=5) as c:
            with pytest.raises(Exception) as ei:
                c.resolve("web", lease=False)
            assert "UNAVAILABLE" in str(getattr(ei.value, "code", ei.value))
        assert "the ACL token was refused" in agent.log()
    finally:
        if agent is not None:
            agent.stop()
        sim.kill()


def test_nearest_locality_follows_consuls_round_trip_order(tmp_path):
    # Five instances on five nodes; the test server sorts ?near=_agent answers by modelled
    # RTT (tests/consulsim/coordinates.py). locality = ["nearest:2", "*"]: picks go to the
    # two nearest healthy instances, and to the next nearest when one of them fails.
    sim = SimProcess()
    agent = None
    try:
        ctl = sim.control
        ctl.set_coordinate(node=AGENT_NODE, rtt=0.0)
        rtt_ms = {"n1": 5, "n2": 1, "n3": 3, "n4": 2, "n5": None}
        for i, (node, ms) in enumerate(rtt_ms.items()):
            ctl.add_node(name=node, address=f"127.0.1.{i + 1}")
            ctl.add_instance(service="web", id="web", node=node, port=8080)
            if ms is not None:
                ctl.set_coordinate(node=node, rtt=ms / 1000)
        config = f"""
[agent]
state_dir = "{tmp_path}/state"
[consul]
wait = "2s"
min_query_interval = "20ms"
first_answer_timeout = "3s"
near = "_agent"
[services.web]
locality = ["nearest:2", "*"]
"""
        agent = AgentProcess(str(tmp_path), "", config, extra_args=["--consul", sim.url]).start()
        with agent.client(timeout=5) as c:
            assert resolve_ids(c, n=40) == {"web@n2", "web@n4"}
            view = c.endpoints("web")
            assert view["locality_level"] == "nearest:2"
            assert {e["id"]: e["rank"] for e in view["endpoints"]} == {
                "web@n2": 0, "web@n4": 1, "web@n3": 2, "web@n1": 3, "web@n5": 4}
            # The nearest fails its Consul check: the next nearest (n3, 3 ms) takes its place.
            ctl.set_check(id="web", node="n2", status="critical")
            wait_until(lambda: resolve_ids(c, n=40) == {"web@n4", "web@n3"}, timeout=3.0, interval=0.02)
            ctl.set_check(id="web", node="n4", status="critical")
            wait_until(lambda: resolve_ids(c, n=40) == {"web@n3", "web@n1"}, timeout=3.0, interval=0.02)
            # n1 moves next door. Consul does not wake a blocking query for a new coordinate;
            # the order arrives with the service's next change (n2 passing again).
            ctl.set_coordinate(node="n1", rtt=0.0005)
            ctl.set_check(id="web", node="n2", status="passing")
            wait_until(lambda: resolve_ids(c, n=40) == {"web@n1", "web@n2"}, timeout=3.0, interval=0.02)
            out = agent.cli("endpoints", "web")
            assert out.returncode == 0, out.stderr
            assert "serving: nearest:2" in out.stdout and "RANK" in out.stdout
            assert "serving the 2 nearest eligible endpoints by rank" in out.stdout
        assert agent.stop() == 0
    finally:
        if agent is not None:
            agent.stop()
        sim.kill()
