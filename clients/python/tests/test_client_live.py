"""The client against a real agent subprocess."""

import os
import signal
import sys
import threading
import time

import pytest
import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tests"))
from agentproc import AgentProcess, endpoint_toml, wait_until  # noqa: E402

from softlb_client import AgentUnavailable, Client, SoftLBError, Timeout  # noqa: E402
from softlb_client.trio_client import AsyncClient  # noqa: E402

CATALOG = "".join(endpoint_toml("web", "127.0.0.1", 18000 + i, id=f"web-{i}") for i in range(1, 4))


@pytest.fixture
def agent(tmp_path):
    a = AgentProcess(str(tmp_path), CATALOG, admin=False).start()
    yield a
    a.stop()


def test_resolve_report_and_reuse(agent):
    with Client(socket_path=agent.socket) as c:
        r = c.resolve("web")
        assert r.lease is not None and r.address == "127.0.0.1"
        c.report(lease=r.lease, ok=True, latency=0.01)
        with pytest.raises(SoftLBError) as e:
            c.report(lease=r.lease)
        assert e.value.code == "UNKNOWN_LEASE"
        sock = c._sock
        for _ in range(10):
            c.resolve("web")
        assert c._sock is sock  # one connection, reused


def test_pipelined_call_many(agent):
    with Client(socket_path=agent.socket) as c:
        out = c.call_many([{"op": "resolve", "service": "web"}, {"op": "resolve", "service": "nope"}, {"op": "services"}])
        assert out[0]["port"] in (18001, 18002, 18003)
        assert isinstance(out[1], SoftLBError) and out[1].code == "UNKNOWN_SERVICE"
        assert out[2][0]["name"] == "web"


def test_agent_restart_between_calls_is_invisible(agent):
    c = Client(socket_path=agent.socket, timeout=10)
    c.resolve("web")
    assert agent.stop() == 0
    agent.start(wait=False)
    # The old connection is dead; the next call reconnects (with backoff while the new
    # agent binds its socket) and succeeds without the caller seeing anything.
    assert c.resolve("web").port in (18001, 18002, 18003)
    c.close()


def test_agent_down_is_a_clear_error_within_the_timeout(tmp_path):
    c = Client(socket_path=str(tmp_path / "missing.sock"), timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(AgentUnavailable):
        c.resolve("web")
    assert time.monotonic() - t0 < 5  # bounded; not a timing claim about the agent


def test_timeout_when_the_agent_does_not_answer(agent):
    agent.send(signal.SIGSTOP)
    try:
        with Client(socket_path=agent.socket, timeout=0.3) as c, pytest.raises(Timeout):
            c.resolve("web")
    finally:
        agent.send(signal.SIGCONT)
    with Client(socket_path=agent.socket) as c:
        assert c.resolve("web")


def collect_watch(c, n, timeout):
    """Run c.watch("web") in a thread; returns (endpoint-id lists seen, event set after n)."""
    updates: list[list[str]] = []
    done = threading.Event()

    def run():
        for d in c.watch("web", timeout=timeout):
            updates.append([e["id"] for e in d["endpoints"]])
            if len(updates) == n:
                done.set()
                return

    threading.Thread(target=run, daemon=True).start()
    wait_until(lambda: updates)
    return updates, done


def test_watch_streams_changes(agent):
    c = Client(socket_path=agent.socket)
    updates, done = collect_watch(c, 2, timeout=10)
    agent.write_catalog(endpoint_toml("web", "127.0.0.1", 18009, id="web-9"))
    assert done.wait(10)
    assert updates == [["web-1", "web-2", "web-3"], ["web-9"]]


def test_watch_unknown_service_is_an_error(agent):
    with pytest.raises(SoftLBError) as e:
        next(Client(socket_path=agent.socket).watch("nope", timeout=5))
    assert e.value.code == "UNKNOWN_SERVICE"


def test_trio_client(agent):
    async def main():
        async with AsyncClient(socket_path=agent.socket) as c:
            assert (await c.hello())["version"] == 1
            ids = [(await c.resolve("web")).id for _ in range(3)]
            assert sorted(ids) == ["web-1", "web-2", "web-3"]
            with pytest.raises(SoftLBError) as e:
                await c.resolve("nope")
            assert e.value.code == "UNKNOWN_SERVICE"
            assert [s["name"] for s in await c.services()] == ["web"]

    trio.run(main)


def test_trio_client_survives_agent_restart(agent):
    async def main():
        async with AsyncClient(socket_path=agent.socket, timeout=10) as c:
            await c.resolve("web")
            await trio.to_thread.run_sync(agent.stop)
            agent.start(wait=False)
            assert (await c.resolve("web")).port in (18001, 18002, 18003)

    trio.run(main)


def test_watch_survives_an_agent_restart(agent):
    c = Client(socket_path=agent.socket, timeout=10)
    updates, done = collect_watch(c, 2, timeout=20)
    old = agent.proc.pid
    assert agent.stop() == 0
    agent.write_catalog(endpoint_toml("web", "127.0.0.1", 18009, id="web-9"))
    agent.start()
    assert agent.proc.pid != old
    assert done.wait(15)
    assert updates == [["web-1", "web-2", "web-3"], ["web-9"]]


def test_ipv6_loopback_address(tmp_path):
    import socket as so

    probe = so.socket(so.AF_INET6)
    try:
        probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = probe.getsockname()[1]
    probe.close()
    a = AgentProcess(str(tmp_path), CATALOG, admin=False, extra_args=["--listen", f"[::1]:{port}"]).start()
    try:
        with Client(addr=f"[::1]:{port}") as c:
            assert c.resolve("web").port in (18001, 18002, 18003)
    finally:
        a.stop()


def test_watch_waits_out_an_agent_that_is_gone_for_a_while(agent):
    c = Client(socket_path=agent.socket, timeout=0.5)
    updates, done = collect_watch(c, 2, timeout=30)
    assert agent.stop() == 0
    time.sleep(2.0)  # longer than the client's timeout: the old watch gave up here
    agent.write_catalog(endpoint_toml("web", "127.0.0.1", 18009, id="web-9"))
    agent.start()
    assert done.wait(15)
    assert updates[-1] == ["web-9"]
