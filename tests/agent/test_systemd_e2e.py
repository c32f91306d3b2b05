"""The real agent as systemd runs it: inherited sockets, notify messages, reload, stop.

A bound AF_UNIX datagram socket stands in for systemd's notify socket; the listening sockets
come from `systemd-socket-activate` or from tests/helpers/socket_holder.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from agentproc import AgentProcess, endpoint_toml, free_port, wait_until

from softlb._wire import encode_frame
from softlb_client import Client
from softlb_client._codec import Decoder

CATALOG = "".join(endpoint_toml("web", "127.0.0.1", 18000 + i, id=f"web-{i}") for i in range(1, 4))


class NotifyListener:
    """systemd's end of NOTIFY_SOCKET: collects every message an agent sends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)

    def next(self, timeout: float = 15.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        return dict(line.split("=", 1) for line in self.sock.recv(4096).decode().split("\n"))

    def until(self, key: str, timeout: float = 15.0) -> tuple[dict[str, str], list[dict[str, str]]]:
        """The first message carrying `key`, and every message before it."""
        seen: list[dict[str, str]] = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.01, deadline - time.monotonic()))
            if key in msg:
                return msg, seen
            seen.append(msg)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    n = NotifyListener(str(tmp_path / "notify.sock"))
    yield n
    n.close()


@pytest.fixture
def agent(tmp_path, notify, monkeypatch):
    """A real agent (its own sockets) that reports to `notify`; yielded once READY."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    a = AgentProcess(str(tmp_path), CATALOG, "", admin=False)
    try:
        a.start()
        notify.until("READY")
        yield a
    finally:
        a.stop()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "softlb_agent", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_agent_under_systemd_socket_activate(tmp_path, notify):
    path, port = str(tmp_path / "softlb.sock"), free_port()
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(CATALOG)
    fallback = tmp_path / "fallback.sock"  # where the agent would bind if it ignored systemd's
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", path, "-l", f"127.0.0.1:{port}", "--fdname=softlb:softlb",
         "-E", f"NOTIFY_SOCKET={notify.path}", "-E", "WATCHDOG_USEC=400000", "-E", f"SOFTLB_SOCKET={fallback}",
         sys.executable, "-m", "softlb_agent", "agent", "--catalog-file", str(catalog),
         "--listen", f"127.0.0.1:{port}", "--admin", ""],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: os.path.exists(path) or proc.poll() is not None)
        # The first connection makes the activator exec the agent; it waits in the backlog.
        with Client(socket_path=path, timeout=15) as c:
            assert c.resolve("web").port in (18001, 18002, 18003)
        ready, before = notify.until("READY")
        assert ready["STATUS"] == "serving 1 service, 3 endpoints; catalog: file (fresh)"
        assert {"STATUS": f"starting: loading catalog (file {catalog})"} in before
        notify.until("WATCHDOG")

        r = cli("resolve", "web", "--json", "--socket", path)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["id"] in ("web-1", "web-2", "web-3")
        r = cli("services", "--addr", f"127.0.0.1:{port}")
        assert r.returncode == 0 and "web" in r.stdout, r.stderr
        with Client(addr=f"127.0.0.1:{port}", timeout=5) as c:
            assert c.services()[0]["name"] == "web"
        assert not fallback.exists()

        os.kill(proc.pid, signal.SIGTERM)
        stopping, _ = notify.until("STOPPING")
        assert stopping["STATUS"].startswith("stopping: draining")
        assert proc.wait(15) == 0
        text = (tmp_path / "agent.log").read_text()
        assert text.count("using the socket passed by the service manager") == 2, text
        assert os.path.exists(path)  # systemd's path: the agent must not unlink it
    finally:
        stop(proc)
        log.close()


def test_sighup_with_a_broken_config_keeps_serving_and_says_why(agent, notify):
    with agent.client(timeout=5) as c:
        c.resolve("web")
        conn = c._sock
        for broken, why in [
            ('[services.web]\npolicy = "round_robbin"\n', 'unknown policy "round_robbin"'),
            ("[agent\n", "not valid TOML"),
        ]:
            agent.write_config(broken)
            agent.send(signal.SIGHUP)
            reloading, _ = notify.until("RELOADING")
            assert "MONOTONIC_USEC" in reloading
            ready, _ = notify.until("READY")
            assert ready["STATUS"].startswith("serving 1 service, 3 endpoints; catalog: file (fresh); reload refused: ")
            assert why in ready["STATUS"]
            assert c.resolve("web").port in (18001, 18002, 18003)
        assert c._sock is conn  # the reloads dropped no connection
        log = agent.log()
        assert "config reload refused, still running the previous config" in log
        assert 'services.web.policy: unknown policy "round_robbin"' in log

        agent.write_config('[services.web]\npolicy = "round_robin"\n')
        agent.send(signal.SIGHUP)
        ready, _ = notify.until("READY")
        assert ready["STATUS"] == "serving 1 service, 3 endpoints; catalog: file (fresh)"
        assert c.resolve("web").port in (18001, 18002, 18003)


def test_stop_answers_the_request_in_flight_and_closes_idle_connections(agent, notify):
    idle = socket.socket(socket.AF_UNIX)
    busy = socket.socket(socket.AF_UNIX)
    for s in (idle, busy):
        s.settimeout(10)
        s.connect(agent.socket)
    frame = encode_frame({"id": 7, "op": "resolve", "service": "web"})
    busy.sendall(frame[:5])  # half a request: in flight when the stop begins
    with agent.client(timeout=5) as c:
        c.services()  # both connections above are accepted by now
    agent.send(signal.SIGTERM)
    notify.until("STOPPING")
    busy.sendall(frame[5:])
    dec = Decoder()
    while (msg := dec.next()) is None:
        data = busy.recv(65536)
        assert data, "closed before answering the request in flight"
        dec.feed(data)
    assert msg["id"] == 7 and msg["result"]["id"] in ("web-1", "web-2", "web-3")
    assert busy.recv(1) == b""  # then closed
    assert idle.recv(1) == b""  # the idle one closed without waiting for the drain bound
    # Exit well inside DRAIN_TIMEOUT (10 s): nothing was left to wait for.
    assert agent.proc.wait(8) == 0
    idle.close()
    busy.close()
