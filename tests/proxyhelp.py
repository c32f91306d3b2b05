"""Backends and clients for the proxy tests: real sockets and real subprocesses, each
stopped by its pid or closed in a finally."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from agentproc import endpoint_toml, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class DemoBackends:
    """examples/backend.py processes: HTTP GET answers "hello from NAME"."""

    def __init__(self, n: int, service: str = "web") -> None:
        self.service = service
        self.ports = [free_port() for _ in range(n)]
        self.names = [f"{service}-{i + 1}" for i in range(n)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for name, port in zip(self.names, self.ports):
            self.procs[name] = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "examples", "backend.py"), "--name", name, "--port", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in self.ports:
            wait_port(port)

    def catalog(self) -> str:
        return "".join(endpoint_toml(self.service, "127.0.0.1", p, id=n) for n, p in zip(self.names, self.ports))

    def kill(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=5)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)


class EchoServer:
    """A threaded TCP server. Each connection first gets `NAME\\n`, then everything it
    sends echoed back; at the client's end of stream it shuts its own write side (a
    correct half-close), unless `hold` is set, in which case it keeps sending `tail` after
    the client's EOF, then closes."""

    def __init__(self, name: str, tail: bytes = b"") -> None:
        self.name = name
        self.tail = tail
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            c.sendall(self.name.encode() + b"\n")
            while True:
                data = c.recv(1 << 16)
                if not data:
                    break
                c.sendall(data)
            if self.tail:
                c.sendall(self.tail)
            c.shutdown(socket.SHUT_WR)
            c.settimeout(5)
            while c.recv(1 << 16):
                pass
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def recv_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def http_get_many(port: int, n: int, path: str = "/", host: str = "x") -> list[str]:
    """`n` GETs on ONE keep-alive connection; the bodies in order."""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    try:
        for _ in range(n):
            c.request("GET", path, headers={"Host": host})
            r = c.getresponse()
            out.append(r.read().decode().strip())
    finally:
        c.close()
    return out
