"""The tcp proxy: a real agent, real backends, real sockets."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from agentproc import endpoint_toml, free_port, wait_until
from proxyhelp import DemoBackends, EchoServer, http_get_many, recv_line, refusing_port, wait_port


def proxy_config(service: str, port: int, mode: str = "tcp", **extra: object) -> str:
    lines = [f"[services.{service}.proxy]", f'listen = "127.0.0.1:{port}"', f'mode = "{mode}"']
    for k, v in extra.items():
        lines.append(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def echoes():
    made: list[EchoServer] = []

    def make(n: int, **kw: object) -> list[EchoServer]:
        new = [EchoServer(f"e{len(made) + i + 1}", **kw) for i in range(n)]
        made.extend(new)
        return new

    yield make
    for e in made:
        e.close()


def echo_catalog(servers: list[EchoServer], service: str = "echo") -> str:
    return "".join(endpoint_toml(service, "127.0.0.1", e.port, id=e.name) for e in servers)


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def test_tcp_one_pick_per_connection(make_agent):
    """One long-lived connection sticks to one backend; new connections spread."""
    b = DemoBackends(3)
    try:
        port = free_port()
        agent = make_agent(b.catalog(), proxy_config("web", port)).start()
        wait_port(port)
        one = http_get_many(port, 300)
        assert len(set(one)) == 1, set(one)
        fresh = {http_get_many(port, 1)[0] for _ in range(9)}
        assert fresh == {f"hello from web-{i}" for i in (1, 2, 3)}
        eps = json.loads(agent.cli("endpoints", "web", "--json").stdout)
        assert sum(e["proxy"]["requests"] for e in eps["endpoints"]) == 1 + 1 + 9  # wait_port connects too
        assert eps["proxy_listener"]["connections"] == 11
        import urllib.request
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{agent.admin_port}/metrics", timeout=10).read().decode()
        from prometheus_client.parser import text_string_to_metric_families

        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(metrics) for s in f.samples}
        assert samples[("softlb_proxy_listener_requests_total", (("service", "web"),))] == 11
        assert ("softlb_proxy_endpoint_requests_total", (("endpoint", "web-1"), ("service", "web"))) in samples
        assert samples[("softlb_proxy_listener_active", (("service", "web"),))] == 0
    finally:
        b.stop()


def test_tcp_half_close_both_ways_and_bulk(make_agent, echoes):
    (e,) = echoes(1, tail=b"after-your-eof\n")
    port = free_port()
    make_agent(echo_catalog([e]), proxy_config("echo", port)).start()
    wait_port(port)
    s = connect(port)
    assert recv_line(s) == b"e1\n"
    # 24 MiB each way, concurrently, through splice: what goes in comes back unchanged.
    blob = os.urandom(1 << 20) * 24
    got = hashlib.sha256()
    received = 0

    def reader() -> None:
        nonlocal received
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                return
            received += len(chunk)
            got.update(chunk)

    t = threading.Thread(target=reader)
    t.start()
    s.sendall(blob)
    # Client half-closes: the backend must see EOF (it then sends its tail and closes),
    # while our read side stays open and gets everything.
    s.shutdown(socket.SHUT_WR)
    t.join(30)
    assert not t.is_alive()
    tail = b"after-your-eof\n"
    assert received == len(blob) + len(tail)
    assert got.hexdigest() == hashlib.sha256(blob + tail).hexdigest()
    s.close()


def test_tcp_upstream_half_close_keeps_client_side_open(make_agent):
    """The backend closes its write side first; the client still sends, and the backend
    still receives."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    got = []

    def backend() -> None:
        c, _ = srv.accept()
        c.sendall(b"bye\n")
        c.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := c.recv(4096):
            data += chunk
        got.append(data)
        c.close()

    t = threading.Thread(target=backend)
    t.start()
    try:
        port = free_port()
        make_agent(endpoint_toml("half", "127.0.0.1", srv.getsockname()[1], id="h1"),
                   proxy_config("half", port)).start()  # ready means listening (no probe connect)
        s = connect(port)
        assert s.recv(100) == b"bye\n"
        assert s.recv(100) == b""  # the backend's EOF reached us
        s.sendall(b"still talking")
        s.shutdown(socket.SHUT_WR)
        t.join(10)
        assert got == [b"still talking"]
        s.close()
    finally:
        srv.close()


def test_tcp_connect_failure_tries_another_and_reports(make_agent, echoes):
    live = echoes(2)
    dead = refusing_port()
    catalog = echo_catalog(live) + endpoint_toml("echo", "127.0.0.1", dead, id="dead")
    port = free_port()
    agent = make_agent(catalog, proxy_config("echo", port, retries=2)).start()
    wait_port(port)
    names = []
    for _ in range(12):
        s = connect(port)
        names.append(recv_line(s).strip().decode())
        s.close()
    assert set(names) == {"e1", "e2"}, names
    eps = {e["id"]: e for e in json.loads(agent.cli("endpoints", "echo", "--json").stdout)["endpoints"]}
    assert eps["dead"]["proxy"]["failures"] >= 1
    assert sum(e["proxy"]["retries"] for e in eps.values()) >= 1
    # Outlier detection heard the failures: after 5 in a row the dead endpoint is ejected.
    for _ in range(12):
        connect(port).close()
    wait_until(lambda: not {e["id"]: e for e in json.loads(agent.cli("endpoints", "echo", "--json").stdout)
                            ["endpoints"]}["dead"]["eligible"])


def test_tcp_every_endpoint_down_closes_the_client(make_agent):
    port = free_port()
    catalog = "".join(endpoint_toml("gone", "127.0.0.1", refusing_port(), id=f"g{i}") for i in range(2))
    agent = make_agent(catalog, proxy_config("gone", port, retries=1)).start()
    wait_port(port)
    s = connect(port)
    with pytest.raises(ConnectionResetError):
        while s.recv(10):
            pass
    s.close()
    assert "no endpoint accepted a connection" in agent.log()


def test_tcp_idle_timeout(make_agent, echoes):
    (e,) = echoes(1)
    port = free_port()
    make_agent(echo_catalog([e]), proxy_config("echo", port, idle_timeout="300ms")).start()
    wait_port(port)
    s = connect(port)
    assert recv_line(s) == b"e1\n"
    for _ in range(4):  # traffic keeps it open past the timeout
        time.sleep(0.15)
        s.sendall(b"x")
        assert s.recv(1) == b"x"
    t0 = time.monotonic()
    try:
        assert s.recv(1) == b""
    except ConnectionResetError:
        pass
    assert 0.2 < time.monotonic() - t0 < 3


def test_tcp_max_connections(make_agent, echoes):
    (e,) = echoes(1)
    port = free_port()
    make_agent(echo_catalog([e]), proxy_config("echo", port, max_connections=2)).start()
    wait_port(port)
    a, b = connect(port), connect(port)
    assert recv_line(a) == recv_line(b) == b"e1\n"
    c = connect(port)  # queued in the kernel, not served
    c.settimeout(0.5)
    with pytest.raises(socket.timeout):
        c.recv(10)
    a.close()
    c.settimeout(5)
    assert recv_line(c) == b"e1\n"
    b.close()
    c.close()


def test_tcp_source_hash_keys_on_client_address(make_agent, echoes):
    servers = echoes(3)
    port = free_port()
    cfg = proxy_config("echo", port) + '[services.echo]\npolicy = "source_hash"\n'
    make_agent(echo_catalog(servers), cfg).start()
    wait_port(port)
    seen = {}
    for src in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"):
        names = set()
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(src, 0))
            names.add(recv_line(s))
            s.close()
        assert len(names) == 1, (src, names)
        seen[src] = names.pop()
    assert len(set(seen.values())) >= 2, seen  # 4 sources over 3 endpoints: not all on one


def test_tcp_reload_adds_changes_removes_without_touching_others(make_agent, echoes):
    e1, e2 = echoes(2)
    catalog = echo_catalog([e1], "a") + echo_catalog([e2], "b")
    pa, pb, pc = free_port(), free_port(), free_port()
    agent = make_agent(catalog, proxy_config("a", pa) + proxy_config("b", pb)).start()
    wait_port(pa)
    wait_port(pb)
    keep = connect(pa)
    assert recv_line(keep) == b"e1\n"
    doomed = connect(pb)
    assert recv_line(doomed) == b"e2\n"
    # a: a new idle timeout only; b: removed; c: new, on the same backend as b.
    agent.write_config(proxy_config("a", pa, idle_timeout="1h") + proxy_config("c", pc)
                       + echo_catalog([e2], "c").replace("endpoints", "x") * 0)
    agent.write_catalog(catalog + echo_catalog([e2], "c"))
    agent.send(signal.SIGHUP)
    wait_port(pc)
    wait_until(lambda: _refused(pb))
    keep.sendall(b"ping")
    assert keep.recv(4) == b"ping"  # the untouched listener's connection lives on
    doomed.sendall(b"pong")  # b's open connection drains; it still works
    assert doomed.recv(4) == b"pong"
    c = connect(pc)
    assert recv_line(c) == b"e2\n"
    for s in (keep, doomed, c):
        s.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_tcp_drain_endpoint_leaving_catalog(make_agent, echoes):
    e1, e2 = echoes(2)
    port = free_port()
    agent = make_agent(echo_catalog([e1, e2]), proxy_config("echo", port, drain_timeout="1s")).start()
    wait_port(port)
    conns = {}
    while len(conns) < 2:
        s = connect(port)
        conns.setdefault(recv_line(s).strip().decode(), s)
    agent.write_catalog(echo_catalog([e2]))  # e1 leaves
    wait_until(lambda: "e1" not in agent.cli("endpoints", "echo").stdout)
    s1 = conns["e1"]
    s1.sendall(b"a")  # still served while draining
    assert s1.recv(1) == b"a"
    for _ in range(4):  # no new work goes to e1
        s = connect(port)
        assert recv_line(s) == b"e2\n"
        s.close()
    t0 = time.monotonic()
    try:
        assert s1.recv(1) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - t0 < 3
    conns["e2"].sendall(b"b")
    assert conns["e2"].recv(1) == b"b"


def test_tcp_listener_refuses_non_loopback(make_agent):
    agent = make_agent(config='[services.web.proxy]\nlisten = "0.0.0.0:9"\n')
    out = subprocess.run([sys.executable, "-m", "softlb_agent", "check", "--config", agent.config_path],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2, out
    assert "services.web.proxy.listen" in out.stdout + out.stderr
