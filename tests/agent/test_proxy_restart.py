"""Agent restarts under socket activation, with HTTP load going through the proxy: the
proxy's listening socket is held as systemd holds it (tests/helpers/socket_holder.py), the
old agent drains (in-flight requests finish, keep-alive clients are told `Connection:
close`), new connections queue in the held socket until the next agent accepts them.
Zero failed requests."""

from __future__ import annotations

import http.client
import signal
import subprocess
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from agentproc import wait_until
from helpers.socket_holder import SocketHolder
from proxyhelp import DemoBackends

TIMEOUT = 20.0  # a request may wait out a whole agent start on a busy machine


@dataclass
class Loop:
    port: int
    keepalive: bool
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        c = None
        while not self.stop.is_set():
            if c is None or not self.keepalive:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
            try:
                c.request("GET", "/")
                r = c.getresponse()
                body = r.read()
                if r.status != 200 or not body.startswith(b"hello from"):
                    self.failed.append(f"{r.status} {body!r}")
                else:
                    self.ok += 1
                if r.getheader("connection", "").lower() == "close":
                    c.close()
                    c = None
            except Exception as e:  # noqa: BLE001 - every failure is what the test counts
                self.failed.append(repr(e))
                c = None
            if not self.keepalive and c is not None:
                c.close()


def test_restarts_under_load_through_the_http_proxy_fail_nothing(tmp_path):
    b = DemoBackends(2)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "softlb.sock")
    unix.bind(path)
    unix.listen(128)
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4096)
    port = tcp.getsockname()[1]
    (tmp_path / "catalog.toml").write_text(b.catalog())
    (tmp_path / "agent.toml").write_text(
        f'[services.web.proxy]\nlisten = "127.0.0.1:{port}"\nmode = "http"\ndrain_timeout = "5s"\n')
    log = open(tmp_path / "agent.log", "ab")
    agent = [sys.executable, "-m", "softlb_agent", "agent", "--config", str(tmp_path / "agent.toml"),
             "--catalog-file", str(tmp_path / "catalog.toml"), "--socket", path, "--listen", "", "--admin", ""]
    loops = [Loop(port, keepalive=True), Loop(port, keepalive=True), Loop(port, keepalive=False)]
    threads = [threading.Thread(target=lp.run, daemon=True) for lp in loops]
    exits = []
    with SocketHolder([("softlb", unix), ("proxy-web", tcp)]) as holder:
        try:
            holder.start(agent, stdout=log, stderr=log)
            for t in threads:
                t.start()
            for sig in (signal.SIGTERM, signal.SIGTERM):
                base = sum(lp.ok for lp in loops)
                wait_until(lambda: all(lp.ok for lp in loops) and sum(lp.ok for lp in loops) > base + 60,
                           timeout=TIMEOUT)
                exits.append(holder.kill(sig, timeout=TIMEOUT))
                at_stop = sum(lp.ok for lp in loops)
                holder.start(agent, stdout=log, stderr=log)
                wait_until(lambda: sum(lp.ok for lp in loops) > at_stop + 60, timeout=TIMEOUT)
        finally:
            for lp in loops:
                lp.stop.set()
            for t in threads:
                t.join(TIMEOUT + 5)
            log.close()
            b.stop()
    agent_log = (tmp_path / "agent.log").read_text()
    assert [lp.failed for lp in loops] == [[], [], []], agent_log[-3000:]
    assert exits == [0, 0]
    assert len(set(holder.pids)) == 3
    assert "proxy-web: using the socket passed by the service manager" in agent_log


def test_an_inherited_non_loopback_proxy_socket_is_refused(tmp_path):
    """Socket activation obeys the loopback rule too: a proxy-<service> socket on 0.0.0.0
    stops the agent at start with a message naming it (unless allow_non_loopback)."""
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "softlb.sock")
    unix.bind(path)
    unix.listen(8)
    wide = socket.socket()
    wide.bind(("0.0.0.0", 0))
    wide.listen(8)
    port = wide.getsockname()[1]
    (tmp_path / "catalog.toml").write_text('[[services.web.endpoints]]\naddress = "127.0.0.1"\nport = 1\n')
    (tmp_path / "agent.toml").write_text(f'[services.web.proxy]\nlisten = "127.0.0.1:{port}"\n')
    agent = [sys.executable, "-m", "softlb_agent", "agent", "--config", str(tmp_path / "agent.toml"),
             "--catalog-file", str(tmp_path / "catalog.toml"), "--socket", path, "--listen", "", "--admin", ""]
    with SocketHolder([("softlb", unix), ("proxy-web", wide)]) as holder:
        child = holder.start(agent, stderr=subprocess.PIPE)
        _, err = child.communicate(timeout=30)
    assert child.returncode == 2, err
    assert b"proxy-web" in err and b"not a loopback address" in err, err
