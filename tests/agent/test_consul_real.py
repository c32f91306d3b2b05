"""The watcher's core behaviours through the Consul agent API only, so the same tests run
against the test server and, when available, a real `consul agent -dev`
(SOFTLB_CONSUL_BIN, or `consul` on PATH)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pytest

from agentproc import free_port

from softlb._types import RegistryHealth
from tests.consulsim import SimServer
from tests.consulsim.testing import agent_config, run, until, watching

CONSUL_BIN = os.environ.get("SOFTLB_CONSUL_BIN") or shutil.which("consul")


class Agent:
    """Registers instances through /v1/agent/* (TTL checks), like a real provider would."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _put(self, path: str, body: object = None) -> None:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="PUT")
        urllib.request.urlopen(req, timeout=5).read()

    def add(self, service: str, sid: str, port: int, address: str = "") -> None:
        self._put("/v1/agent/service/register", {
            "Name": service, "ID": sid, "Port": port, "Address": address,
            "Check": {"CheckID": f"ttl:{sid}", "TTL": "60s", "Status": "passing"}})

    def fail(self, sid: str) -> None:
        self._put(f"/v1/agent/check/fail/ttl:{sid}?note=down")

    def remove(self, sid: str) -> None:
        self._put(f"/v1/agent/service/deregister/{sid}")


def _start_real_consul():
    if not CONSUL_BIN:
        pytest.skip("no consul binary: set SOFTLB_CONSUL_BIN or put consul on PATH")
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="softlb-consul-")
    args = [CONSUL_BIN, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
            "-http-port", str(port), "-dns-port", "-1", "-grpc-port", "-1",
            "-serf-lan-port", str(free_port()), "-serf-wan-port", str(free_port()),
            "-server-port", str(free_port()), "-data-dir", data_dir]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url + "/v1/status/leader", timeout=1).read() not in (b'""', b""):
                return proc, url, data_dir
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    pytest.fail("consul agent -dev did not elect a leader within 20 s")


@pytest.fixture(params=["consulsim", "consul"])
def consul_url(request):
    if request.param == "consulsim":
        with SimServer() as srv:
            yield srv.url
        return
    proc, url, data_dir = _start_real_consul()
    try:
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_follow_adds_criticals_and_removals(consul_url):
    agent = Agent(consul_url)
    agent.add("web", "web-a", 8080, address="10.9.0.1")

    async def body():
        async with watching(agent_config(consul_url, keep_previous_on_empty=0)) as (src, rec):
            await until(lambda: [e.address for e in rec.eps("web")] == ["10.9.0.1"])
            # A healthy cluster's answers are not stale, whichever backend answered (a real
            # Consul >= 1.10 streams blocking reads, with KnownLeader false).
            assert not rec.stale("web")
            # No Service.Address: the node's address (127.0.0.1 for both backends here).
            agent.add("web", "web-b", 8081)
            await until(lambda: len(rec.eps("web")) == 2, timeout=1.0)
            b = next(e for e in rec.eps("web") if e.id.startswith("web-b@"))
            assert (b.address, b.port) == ("127.0.0.1", 8081)
            agent.fail("web-a")
            await until(lambda: next(e for e in rec.eps("web") if e.id.startswith("web-a@")).registry
                        is RegistryHealth.CRITICAL, timeout=1.0)
            agent.remove("web-a")
            agent.remove("web-b")
            await until(lambda: rec.eps("web") == (), timeout=1.0)
            assert src.status.state == "ok" and not rec.stale("web")
    run(body)


def test_a_deregistered_provider_comes_back(consul_url):
    """Consul loses our registration (an operator deregisters it, or the agent restarts
    without state): the next TTL update is refused (404 on current Consul, which py-consul
    returns as False; 500 on old ones) and the registrar registers it again."""
    import trio as _trio

    from softlb._config import ProvideConfig
    from softlb_agent.consul_http import consul_settings
    from softlb_agent.consul_register import ProviderRegistrar
    from softlb._backoff import RetryPolicy

    async def body():
        listener = (await _trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        cfg = agent_config(consul_url)
        reg = ProviderRegistrar([ProvideConfig(name="api", port=port, ttl=1.5)],
                                consul_settings(cfg.consul), retry=RetryPolicy(base=0.05, cap=0.2))
        sid = f"api-{port}"

        def registered() -> bool:
            with urllib.request.urlopen(consul_url + "/v1/agent/services", timeout=5) as r:
                return sid in json.loads(r.read())
        async with _trio.open_nursery() as n:
            await n.start(reg.run)
            assert registered()
            Agent(consul_url).remove(sid)
            assert not registered()
            await until(registered, timeout=5)
            assert reg.reregistrations == 1
            n.cancel_scope.cancel()
        assert not registered()
        await listener.aclose()
    run(body)


def test_near_ranks_instances_and_nearest_follows_failures(consul_url):
    """`near = "_agent"`: Consul takes `?near=_agent` and every endpoint carries its place
    in the answer; a "nearest:1" level serves the first and moves on when it fails. The
    instances share one node here (a dev agent is one node), so this checks the plumbing
    against a real Consul; the RTT order itself is the test server's (test_consulsim.py,
    test_consul_e2e.py)."""
    import random

    from softlb import AgentConfig, Engine, LeaseScope, ServiceConfig
    from softlb._config import ConsulQuery

    agent = Agent(consul_url)
    for i, sid in enumerate(("web-a", "web-b", "web-c")):
        agent.add("web", sid, 8080 + i)
    engine = Engine(AgentConfig(services={"web": ServiceConfig(locality=("nearest:1", "*"))}), random.Random(1))

    def picks(eps):
        engine.replace_all({"web": list(eps)}, 0.0)
        return {engine.pick("web", 0.0, scope=LeaseScope.NONE).endpoint.id for _ in range(20)}

    async def body():
        cfg = agent_config(consul_url, query=ConsulQuery(near="_agent"))
        async with watching(cfg) as (src, rec):
            await until(lambda: len(rec.eps("web")) == 3)
            eps = rec.eps("web")
            assert sorted(e.rank for e in eps) == [0, 1, 2]
            first, second = sorted(eps, key=lambda e: e.rank)[:2]
            assert picks(eps) == {first.id}
            agent.fail(first.id.split("@")[0])
            await until(lambda: any(e.registry is RegistryHealth.CRITICAL for e in rec.eps("web")), timeout=2.0)
            assert picks(rec.eps("web")) == {second.id}
            assert src.status.state == "ok"
    run(body)
