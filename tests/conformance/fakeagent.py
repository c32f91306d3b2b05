"""A tiny scripted agent speaking the wire protocol on a real Unix socket, for what today's
agent cannot show: a newer agent (extra fields, extra ops) and a v1-only agent."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Callable

import msgpack

from tests.conformance.wire import frame

Handler = Callable[[dict[str, Any]], "dict[str, Any] | None"]


class FakeAgent:
    """Serves `handler(request) -> answer map (or None: no answer)` on `path`, one thread per
    connection; `stop()` closes everything it opened."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self._conns: list[socket.socket] = []
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(path)
        self._srv.listen(16)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                    n = int.from_bytes(buf[:4], "big")
                    req = msgpack.unpackb(buf[4:4 + n], raw=False)
                    buf = buf[4 + n:]
                    self.requests.append(req)
                    answer = self.handler(req)
                    if answer is not None:
                        conn.sendall(frame(answer))
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self._closed = True
        self._srv.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def endpoint(eid: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"address": "127.0.0.1", "port": port, "id": eid, "tags": [], "meta": {}, "weight": 1,
            "node": "", "zone": "", "region": "", **extra}


def newer_agent(req: dict[str, Any]) -> dict[str, Any]:
    """An agent from the future: version 2 besides 1, ops and fields this protocol lacks,
    extra keys beside `id`/`result`. A v1 client must take what it knows and ignore the rest."""
    rid, op = req.get("id"), req.get("op")
    extra = {"trace": "t-1", "server_time": 1.5}
    if op == "hello":
        offered = req.get("versions") or [1]
        common = sorted(set(offered) & {1, 2})
        if not common:
            return {"id": rid, "error": {"code": "UNSUPPORTED_VERSION", "message": "speaks 1, 2"}}
        return {"id": rid, "result": {"version": common[-1], "agent": "softlb/9.0.0",
                                      "ops": ["hello", "resolve", "report", "services", "endpoints", "watch",
                                              "unwatch", "drain", "subscribe"],
                                      "max_frame": 1 << 20, "features": {"batch": True}}, **extra}
    if op == "resolve":
        return {"id": rid, "result": {**endpoint("web-1", 18001, cost=3, hints={"retry_after": 0.5},
                                                  labels=["a", "b"]),
                                      "lease": 7 if req.get("lease", True) else None, "panic": False,
                                      "stale": False, "shard": 4}, **extra}
    if op == "report":
        return {"id": rid, "result": {"accepted": True}, **extra}
    if op == "services":
        return {"id": rid, "result": [{"name": "web", "policy": "round_robin", "endpoints": 1, "eligible": 1,
                                       "panic": False, "stale": False, "owner": "team-a"}], **extra}
    if op in ("endpoints", "watch"):
        return {"id": rid, "result": {"service": "web", "policy": "round_robin", "version": 1, "panic": False,
                                      "stale": False, "age": None, "generation": 12,
                                      "endpoints": [{**endpoint("web-1", 18001), "registry": "passing",
                                                     "eligible": True, "cost": 3}]}, **extra}
    return {"id": rid, "error": {"code": "UNKNOWN_OP", "message": f"unknown op {op!r}"}}


def v1_only_agent(req: dict[str, Any]) -> dict[str, Any]:
    """An agent that speaks version 1 only (as today's does), answering hello by the rule."""
    rid = req.get("id")
    if req.get("op") == "hello":
        if 1 not in (req.get("versions") or [1]):
            return {"id": rid, "error": {"code": "UNSUPPORTED_VERSION", "message": "this agent speaks version 1"}}
        return {"id": rid, "result": {"version": 1, "agent": "softlb/0.1.0", "ops": ["hello"], "max_frame": 1 << 20}}
    return {"id": rid, "error": {"code": "UNKNOWN_OP", "message": "only hello here"}}
