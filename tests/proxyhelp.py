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

from agentproc import endpoint_toml, free_port, refusing_port  # noqa: F401  (re-exported)

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


class HttpBackend:
    """A threaded HTTP/1.1 backend built on http.server, for header, body and failure
    cases. Paths:
      /echo          200, JSON of method, path, headers and the request body's length and sha256
      /big?n=N       200, N bytes streamed chunked (no Content-Length)
      /status/NNN    that status
      /slow?s=S      answers after S seconds
      /reset         closes the connection without answering (a crash mid-request)
      /ws            101 Switching Protocols, then echoes raw bytes
    Every answer carries `X-Backend: NAME`; `hits` counts requests per path."""

    def __init__(self, name: str) -> None:
        import collections
        import hashlib
        import http.server
        import json
        import urllib.parse

        backend = self
        self.name = name
        self.hits: collections.Counter[str] = collections.Counter()

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def _body(self) -> tuple[int, str]:
                h = hashlib.sha256()
                n = 0
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            break
                        left = size
                        while left:
                            d = self.rfile.read(min(left, 1 << 16))
                            h.update(d)
                            left -= len(d)
                        n += size
                        self.rfile.readline()
                else:
                    left = int(self.headers.get("Content-Length") or 0)
                    while left:
                        d = self.rfile.read(min(left, 1 << 16))
                        if not d:
                            break
                        h.update(d)
                        n += len(d)
                        left -= len(d)
                return n, h.hexdigest()

            def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("X-Backend", backend.name)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _any(self) -> None:
                u = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(u.query))
                backend.hits[u.path] += 1
                if u.path == "/reset":
                    self.close_connection = True
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    return
                if u.path == "/ws":
                    self.send_response(101)
                    self.send_header("Upgrade", "websocket")
                    self.send_header("Connection", "Upgrade")
                    self.end_headers()
                    self.wfile.flush()
                    while d := self.connection.recv(4096):
                        self.connection.sendall(d)
                    self.close_connection = True
                    return
                n, sha = self._body()
                if u.path == "/echo":
                    doc = {"backend": backend.name, "method": self.command, "path": self.path,
                           "headers": [[k.lower(), v] for k, v in self.headers.items()], "length": n, "sha256": sha}
                    self._reply(200, json.dumps(doc).encode(), "application/json")
                elif u.path == "/big":
                    self.send_response(200)
                    self.send_header("X-Backend", backend.name)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    left = int(q["n"])
                    block = b"z" * (1 << 16)
                    while left:
                        k = min(left, len(block))
                        self.wfile.write(b"%x\r\n" % k + block[:k] + b"\r\n")
                        left -= k
                    self.wfile.write(b"0\r\n\r\n")
                elif u.path.startswith("/status/"):
                    self._reply(int(u.path[8:]), b"as asked\n")
                elif u.path == "/slow":
                    time.sleep(float(q["s"]))
                    self._reply(200, b"slow\n")
                else:
                    self._reply(200, f"hello from {backend.name}\n".encode())

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._t = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._t.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GrpcBackend:
    """A grpcio server (bytes in, bytes out; no protobuf needed) on an h2c port:
    /demo.Echo/Call answers `NAME:` + the request; /demo.Echo/Fail answers UNAVAILABLE;
    /demo.Echo/Slow sleeps the request's seconds first (deadlines)."""

    def __init__(self, name: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        self.name = name
        self.calls = 0

        def call(req: bytes, ctx: object) -> bytes:
            self.calls += 1
            return name.encode() + b":" + req

        def fail(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            self.calls += 1
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "down for the test")
            return b""

        def slow(req: bytes, ctx: object) -> bytes:
            self.calls += 1
            time.sleep(float(req))
            return b"late"

        handler = grpc.method_handlers_generic_handler("demo.Echo", {
            "Call": grpc.unary_unary_rpc_method_handler(call),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
        })
        self.server = grpc.server(ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(grace=None)
