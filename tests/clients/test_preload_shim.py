"""The connect-time shim (clients/c/preload, libsoftlb-preload.so) with real programs.

A real agent serves `web` (three real HTTP backends on loopback); curl, a Python urllib
one-liner and a non-blocking Python client run under LD_PRELOAD against
http://web.service.softlb:8080/ and must reach every healthy backend in round-robin order;
a killed backend must fail no run. Every process is started here and stopped by its pid.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from agentproc import AgentProcess, endpoint_toml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
C_DIR = os.path.join(ROOT, "clients", "c")
SHIM = os.path.join(C_DIR, "build", "libsoftlb-preload.so")
URL = "http://web.service.softlb:8080/"
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

URLLIB = "import urllib.request as u; print(u.urlopen('%s', timeout=5).read().decode())" % URL
# A non-blocking client: connect() may answer EINPROGRESS; wait for writability, then HTTP.
NONBLOCK = r"""
import select, socket, sys
ai = socket.getaddrinfo('web.service.softlb', 8080, socket.AF_INET, socket.SOCK_STREAM)[0]
s = socket.socket(ai[0], ai[1]); s.setblocking(False)
rc = s.connect_ex(ai[4])
assert rc in (0, 115), rc
_, w, _ = select.select([], [s], [], 5); assert w
err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR); assert err == 0, err
s.setblocking(True); s.settimeout(5)
s.sendall(b'GET / HTTP/1.0\r\nHost: web\r\n\r\n')
data = b''
while True:
    b = s.recv(4096)
    if not b: break
    data += b
print(data.split(b'\r\n\r\n', 1)[1].decode())
"""


class Backend:
    """An HTTP server on 127.0.0.1 answering its own id."""

    def __init__(self, ident: str) -> None:
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = ident.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def shim():
    gone = [t for t in ("make", "cc", "pkg-config", "curl") if shutil.which(t) is None]
    if gone:
        pytest.skip(f"toolchain missing: {', '.join(gone)} (Debian: gcc make pkg-config libmsgpack-dev curl)")
    r = subprocess.run(["make", "-s", "--no-print-directory", "-C", C_DIR, "preload"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return SHIM


@pytest.fixture
def world(tmp_path, shim):
    backends = [Backend(f"web-{i}") for i in (1, 2, 3)]
    catalog = "".join(endpoint_toml("web", "127.0.0.1", b.port, id=f"web-{i}") for i, b in enumerate(backends, 1))
    agent = AgentProcess(str(tmp_path), catalog)
    try:
        agent.start()
        yield agent, backends
    finally:
        agent.stop()
        for b in backends:
            b.stop()


def run(agent_socket: str, argv: list[str], timeout: float = 10.0, **env: str) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "LD_PRELOAD": SHIM, "SOFTLB_SOCKET": agent_socket, **env}
    e.pop("http_proxy", None), e.pop("HTTP_PROXY", None), e.pop("all_proxy", None)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=e)


CLIENTS = {
    "curl": ["curl", "-sS", "--noproxy", "*", "--max-time", "5", URL],
    "urllib": [PY, "-c", URLLIB],
    "nonblocking": [PY, "-c", NONBLOCK],
}


def is_rotation(seq: list[str], order: list[str]) -> bool:
    start = order.index(seq[0])
    return all(s == order[(start + i) % len(order)] for i, s in enumerate(seq))


@pytest.mark.parametrize("client", list(CLIENTS))
def test_thirty_runs_reach_every_backend_in_round_robin_order(world, client):
    agent, _ = world
    seen = []
    for _ in range(30):
        r = run(agent.socket, CLIENTS[client])
        assert r.returncode == 0, r.stderr
        seen.append(r.stdout.strip())
    assert set(seen) == {"web-1", "web-2", "web-3"}
    assert is_rotation(seen, ["web-1", "web-2", "web-3"]), seen


@pytest.mark.parametrize("client", list(CLIENTS))
def test_a_killed_backend_fails_no_run(world, client):
    agent, backends = world
    backends[1].stop()
    seen = []
    for _ in range(30):
        r = run(agent.socket, CLIENTS[client])
        assert r.returncode == 0, r.stderr
        seen.append(r.stdout.strip())
    assert set(seen) == {"web-1", "web-3"}


def test_unknown_service_is_an_unknown_host(world):
    agent, _ = world
    r = run(agent.socket, ["curl", "-sS", "--max-time", "5", "http://nope.service.softlb:8080/"])
    assert r.returncode == 6, (r.returncode, r.stderr)   # curl: could not resolve host


def test_other_connections_pass_through(world):
    agent, backends = world
    r = run(agent.socket, ["curl", "-sS", "--noproxy", "*", "--max-time", "5", f"http://127.0.0.1:{backends[2].port}/"])
    assert r.returncode == 0 and r.stdout == "web-3", r.stderr


def test_other_connections_pass_through_silently_without_an_agent(world, tmp_path):
    _, backends = world
    cmd = [PY, "-c", "import socket, time, urllib.request as u\n"
           "t0 = time.monotonic()\n"
           f"body = [u.urlopen('http://127.0.0.1:{backends[0].port}/', timeout=5).read().decode() for _ in range(5)]\n"
           "print(body[0], time.monotonic() - t0)"]
    r = run(str(tmp_path / "nowhere.sock"), cmd)
    body, secs = r.stdout.split()
    assert r.returncode == 0 and body == "web-1", r.stderr
    assert r.stderr == ""   # not a service: nothing to say about the agent
    assert float(secs) < 3


def test_no_agent_at_name_lookup_says_so_once_and_fails_as_without_the_shim(world, tmp_path):
    t0 = time.monotonic()
    r = run(str(tmp_path / "nowhere.sock"), ["curl", "-sS", "--max-time", "5", URL])
    assert time.monotonic() - t0 < 5
    assert r.returncode == 6, r.stderr   # the real resolver's answer: no such host
    assert r.stderr.count("softlb-preload: the softlb agent is unreachable") == 1, r.stderr


AGENT_GOES_AWAY = r"""
import socket, sys, time
ai = socket.getaddrinfo('web.service.softlb', 8080, socket.AF_INET, socket.SOCK_STREAM)[0]
print('resolved', flush=True)
sys.stdin.readline()
for _ in range(2):
    s = socket.socket(ai[0], ai[1])
    t0 = time.monotonic()
    print(s.connect_ex(ai[4]), round(time.monotonic() - t0, 2), flush=True)
"""


def test_no_agent_at_connect_fails_the_connect_with_refused_and_says_so_once(world):
    agent, _ = world
    e = {**os.environ, "LD_PRELOAD": SHIM, "SOFTLB_SOCKET": agent.socket, "SOFTLB_PRELOAD_TIMEOUT_MS": "300"}
    p = subprocess.Popen([PY, "-c", AGENT_GOES_AWAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=e)
    try:
        assert p.stdout.readline().strip() == "resolved"
        agent.stop()
        out, err = p.communicate("go\n", timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    lines = out.split()
    assert lines[0::2] == ["111", "111"], out   # ECONNREFUSED, as an address with no listener
    assert all(float(t) < 3 for t in lines[1::2]), out   # bounded by the 300 ms timeout
    assert err.count("softlb-preload: the softlb agent is unreachable") == 1, err


THREADS_AND_FORK = r"""
import os, threading, urllib.request as u
URL = 'http://web.service.softlb:8080/'
out = []
def work():
    for _ in range(10):
        out.append(u.urlopen(URL, timeout=5).read().decode())
ts = [threading.Thread(target=work) for _ in range(6)]
[t.start() for t in ts]; [t.join() for t in ts]
pid = os.fork()
if pid == 0:
    ok = all(u.urlopen(URL, timeout=5).read().decode().startswith('web-') for _ in range(6))
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
print(len(out), len(set(out)), status, u.urlopen(URL, timeout=5).read().decode()[:4])
"""


def test_threads_and_a_forked_child(world):
    agent, _ = world
    r = run(agent.socket, [PY, "-c", THREADS_AND_FORK], timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["60", "3", "0", "web-"], r.stdout


def test_vip_connect(tmp_path, shim):
    """connect() to a service VIP (agent config `vip`, from the dns branch) is balanced."""
    backends = [Backend(f"web-{i}") for i in (1, 2)]
    catalog = "".join(endpoint_toml("web", "127.0.0.1", b.port, id=f"web-{i}") for i, b in enumerate(backends, 1))
    agent = AgentProcess(str(tmp_path), catalog, config='[services.web]\nvip = "127.77.0.5:8080"\n')
    try:
        try:
            agent.start()
        except RuntimeError as e:
            pytest.skip(f"this agent has no service VIPs yet (issue 15, dns branch): {str(e)[-200:]}")
        with agent.client() as c:
            if "vip" not in c.services()[0]:
                pytest.skip("this agent does not announce VIPs yet (issue 15, dns branch)")
        seen = [run(agent.socket, ["curl", "-sS", "--noproxy", "*", "--max-time", "5", "http://127.77.0.5:8080/"]).stdout
                for _ in range(6)]
        assert set(seen) == {"web-1", "web-2"}, seen
        # another port on the VIP's address is not the service: untouched (nothing listens)
        r = run(agent.socket, ["curl", "-sS", "--noproxy", "*", "--max-time", "5", "http://127.77.0.5:8081/"])
        assert r.returncode == 7, r.stderr
    finally:
        agent.stop()
        for b in backends:
            b.stop()


class VipAgent:
    """A stand-in agent on a Unix socket that announces VIPs (VIP-API.md's wire shape) and
    picks round robin: the shim's VIP path, tested before the real agent has VIPs."""

    def __init__(self, path: str, backends: list[Backend], vip: dict) -> None:
        import socket

        self.backends, self.vip, self.rr, self.reports = backends, vip, 0, []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(64)
        self.path = path
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _answer(self, req: dict) -> dict:
        op = req.get("op")
        if op == "services":
            return {"result": [{"name": "web", "policy": "round_robin", "endpoints": 2, "eligible": 2,
                                "panic": False, "stale": False, "vip": self.vip}]}
        if op == "resolve":
            b = self.backends[self.rr % len(self.backends)]
            self.rr += 1
            return {"result": {"address": "127.0.0.1", "port": b.port, "id": f"web-{self.backends.index(b) + 1}",
                               "tags": [], "meta": {}, "weight": 1, "node": "", "zone": "", "region": "",
                               "lease": None, "panic": False, "stale": False}}
        if op == "report":
            self.reports.append(req)
            return {"result": {}}
        return {"error": {"code": "UNKNOWN_OP", "message": op}}

    def _serve(self, c) -> None:
        import msgpack

        buf = b""
        with c:
            while True:
                data = c.recv(65536)
                if not data:
                    return
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                    k = int.from_bytes(buf[:4], "big")
                    req = msgpack.unpackb(buf[4:4 + k])
                    buf = buf[4 + k:]
                    body = msgpack.packb({"id": req.get("id"), **self._answer(req)})
                    c.sendall(len(body).to_bytes(4, "big") + body)

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)


@pytest.mark.parametrize("vip, other_port_balanced", [({"address": "127.77.0.5", "port": 8080}, False),
                                                      ({"address": "127.77.0.6", "port": 0}, True)])
def test_vip_connects_are_balanced(tmp_path, shim, vip, other_port_balanced):
    backends = [Backend(f"web-{i}") for i in (1, 2)]
    agent = VipAgent(str(tmp_path / "agent.sock"), backends, vip)
    url = f"http://{vip['address']}:8080/"
    try:
        seen = [run(agent.path, ["curl", "-sS", "--noproxy", "*", "--max-time", "5", url]).stdout for _ in range(6)]
        assert seen == ["web-1", "web-2"] * 3, seen
        # A VIP with a port is that port only: another port on the address is not the service.
        r = run(agent.path, ["curl", "-sS", "--noproxy", "*", "--max-time", "5", f"http://{vip['address']}:8081/"])
        assert (r.returncode == 0) == other_port_balanced, r.stderr
        # A dead endpoint behind a VIP: reported, and the next pick serves the run.
        backends[0].stop()
        agent.rr = 0
        r = run(agent.path, ["curl", "-sS", "--noproxy", "*", "--max-time", "5", url])
        assert r.returncode == 0 and r.stdout == "web-2", r.stderr
        assert agent.reports and agent.reports[-1]["endpoint"] == "web-1" and agent.reports[-1]["ok"] is False
    finally:
        agent.close()
        for b in backends[1:]:
            b.stop()


def test_pool_vip_connect(tmp_path, shim):
    """A service with a pool VIP (agent.vip_pool: an address, every port) is balanced at connect."""
    backends = [Backend(f"web-{i}") for i in (1, 2)]
    catalog = "".join(endpoint_toml("web", "127.0.0.1", b.port, id=f"web-{i}") for i, b in enumerate(backends, 1))
    agent = AgentProcess(str(tmp_path), catalog, config='[agent]\nvip_pool = "127.77.0.0/16"\n')
    try:
        try:
            agent.start()
        except RuntimeError as e:
            pytest.skip(f"this agent has no VIP pool yet (issue 15, dns branch): {str(e)[-200:]}")
        with agent.client() as c:
            vip = c.services()[0].get("vip")
        if not vip:
            pytest.skip("this agent does not announce VIPs yet (issue 15, dns branch)")
        assert vip["port"] == 0
        seen = [run(agent.socket, ["curl", "-sS", "--noproxy", "*", "--max-time", "5",
                                   f"http://{vip['address']}:{port}/"]).stdout for port in (80, 8080, 9999, 1234)]
        assert seen == ["web-1", "web-2"] * 2, seen
    finally:
        agent.stop()
        for b in backends:
            b.stop()
