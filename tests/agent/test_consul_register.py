"""Provider registration against the Consul API test server (py-consul over real HTTP)."""

from __future__ import annotations

import pytest
import trio

from softlb._backoff import RetryPolicy
from softlb._config import ConsulConfig, ProvideConfig
from softlb_agent.consul_http import consul_settings
from softlb_agent.consul_register import ProviderRegistrar
from tests.consulsim import AGENT_NODE, SimServer
from tests.consulsim.testing import run, until


@pytest.fixture
def srv():
    with SimServer() as s:
        yield s


def registrar(srv, *provides):
    return ProviderRegistrar(provides, consul_settings(ConsulConfig(address=srv.url), {}),
                             retry=RetryPolicy(base=0.05, cap=0.2))


def check(srv, check_id):
    return srv.sim.checks.get((AGENT_NODE, check_id))


def test_ttl_registration_keepalive_reregister_and_deregister(srv):
    async def body():
        listener = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener[0].socket.getsockname()[1]
        reg = registrar(srv, ProvideConfig(name="api", port=port, tags=("v1",), ttl=0.6,
                                           meta={"team": "x"}, weight=5, warning_weight=2))
        async with trio.open_nursery() as n:
            await n.start(reg.run)
            inst = srv.sim.instances[(AGENT_NODE, f"api-{port}")]
            assert (inst.service, inst.port, inst.tags, inst.meta) == ("api", port, ["v1"], {"team": "x"})
            assert inst.weights == {"Passing": 5, "Warning": 2}
            c = check(srv, f"softlb:api-{port}")
            assert (c.kind, c.status) == ("ttl", "passing") and "ok" in c.output
            # Kept alive across several TTLs.
            await trio.sleep(1.5)
            assert check(srv, f"softlb:api-{port}").status == "passing"
            # The local service dies: our probe fails the check.
            for l in listener:
                await l.aclose()
            await until(lambda: check(srv, f"softlb:api-{port}").status == "critical", timeout=3)
            # Consul loses the registration: it comes back.
            # (Current Consul answers the next TTL update 404, which py-consul returns as False.)
            srv.sim.deregister(f"api-{port}")
            await until(lambda: (AGENT_NODE, f"api-{port}") in srv.sim.instances, timeout=3)
            assert reg.reregistrations == 1
            n.cancel_scope.cancel()
        # Clean shutdown deregisters.
        assert (AGENT_NODE, f"api-{port}") not in srv.sim.instances
        assert check(srv, f"softlb:api-{port}") is None

    run(body, timeout=15)


@pytest.mark.parametrize("kind", ["http", "tcp"])
def test_consul_side_checks_and_presence(srv, kind):
    async def body():
        reg = registrar(srv, ProvideConfig(name="web", port=1, id="web-a", check=kind,
                                           check_interval=0.3, check_path="/health"))
        async with trio.open_nursery() as n:
            await n.start(reg.run)
            c = check(srv, "softlb:web-a")
            assert c.kind == kind
            assert c.target == ("http://127.0.0.1:1/health" if kind == "http" else "127.0.0.1:1")
            # Nothing listens on port 1: Consul's own probe marks it critical.
            await until(lambda: check(srv, "softlb:web-a").output != "", timeout=3)
            assert check(srv, "softlb:web-a").status == "critical"
            srv.sim.deregister("web-a")
            await until(lambda: (AGENT_NODE, "web-a") in srv.sim.instances, timeout=3)
            n.cancel_scope.cancel()
        assert (AGENT_NODE, "web-a") not in srv.sim.instances

    run(body, timeout=15)


def test_consul_down_at_start_then_registers(srv):
    url = srv.url
    port = srv.port
    srv.stop()

    async def body():
        reg = ProviderRegistrar([ProvideConfig(name="x", port=5, check="none")],
                                consul_settings(ConsulConfig(address=url), {}),
                                retry=RetryPolicy(base=0.05, cap=0.2))
        async with trio.open_nursery() as n:
            await n.start(reg.run)  # does not hang or fail when Consul is down
            assert reg.registrations[0].state.startswith("error: ConnectionError")
            with SimServer(port=port) as again:
                await until(lambda: (AGENT_NODE, "x-5") in again.sim.instances, timeout=5)
                assert reg.registrations[0].state == "registered"
                n.cancel_scope.cancel()

    run(body, timeout=15)


def test_acl_denied_registration_is_reported(srv):
    srv.sim.set_acl("secret")

    async def body():
        reg = registrar(srv, ProvideConfig(name="x", port=5, check="none"))
        async with trio.open_nursery() as n:
            await n.start(reg.run)
            assert "ACLPermissionDenied" in reg.registrations[0].state
            n.cancel_scope.cancel()

    run(body, timeout=10)


def test_a_register_in_flight_at_shutdown_is_deregistered():
    """Consul applies a register on receipt but answers slowly; the agent stops meanwhile.
    The registration must not outlive the agent."""
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    registered: dict[str, object] = {}

    class SlowConsul(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_PUT(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.startswith("/v1/agent/service/register"):
                d = json.loads(body)
                registered[d.get("id") or d.get("ID")] = d
                time.sleep(1.0)
            elif self.path.startswith("/v1/agent/service/deregister/"):
                registered.pop(self.path.rsplit("/", 1)[1].split("?")[0], None)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowConsul)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = consul_settings(ConsulConfig(address=f"http://127.0.0.1:{server.server_address[1]}"), environ={})
        r = ProviderRegistrar([ProvideConfig(name="web", port=18080, check="none")], settings)

        async def main():
            with trio.move_on_after(0.3):  # the stop arrives while the register is in flight
                await r.run()

        trio.run(main)
        assert registered == {}
    finally:
        server.shutdown()
        server.server_close()


def test_check_definition_carries_deregister_after():
    from softlb_agent.consul_register import Registration, check_definition
    reg = Registration(ProvideConfig(name="api", port=1, deregister_after=90.0), "api-1", "softlb:api-1")
    assert check_definition(reg)["DeregisterCriticalServiceAfter"] == "90s"
    reg = Registration(ProvideConfig(name="api", port=1, deregister_after=0.0), "api-1", "softlb:api-1")
    assert "DeregisterCriticalServiceAfter" not in check_definition(reg)
