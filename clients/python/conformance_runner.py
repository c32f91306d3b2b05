"""Conformance runner for the Python client (tests/conformance/RUNNER.md).

JSON lines on stdin drive softlb_client's public API; one JSON line per reply or watch event
on stdout. Watches run in threads (the blocking client's watch is a generator).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from softlb_client import AgentUnavailable, Client, ProtocolError, SoftLBError, Timeout
from softlb_client._codec import Decoder, encode, result_of

_out = threading.Lock()


def emit(obj: dict[str, Any]) -> None:
    line = json.dumps(obj, default=lambda v: v.hex() if isinstance(v, bytes) else repr(v))
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def error_of(e: BaseException) -> dict[str, str]:
    if isinstance(e, Timeout):
        code = "TIMEOUT"
    elif isinstance(e, AgentUnavailable):
        code = "UNAVAILABLE_AGENT"
    elif isinstance(e, ProtocolError) or not isinstance(e, SoftLBError):
        code = "CLIENT"
    else:
        code = e.code
    return {"code": code, "message": getattr(e, "message", str(e))}


def vectors(path: str) -> dict[str, Any]:
    passed, failed = 0, []
    with open(path) as f:
        cases = json.load(f)
    for v in cases:
        try:
            ok = _vector_ok(v)
        except Exception:
            ok = False
        if ok:
            passed += 1
        else:
            failed.append(v["name"])
    return {"passed": passed, "failed": failed}


def _vector_ok(v: dict[str, Any]) -> bool:
    raw = bytes.fromhex(v["hex"])
    if v["kind"] == "request":
        return encode(v["value"]).hex() == v["hex"]
    d = Decoder()
    if v["kind"] == "response":
        for i in range(len(raw)):  # any split
            d.feed(raw[i:i + 1])
        msg = d.next()
        if msg != v["value"] or d.next() is not None:
            return False
        if "error" in msg:
            try:
                result_of(msg)
            except SoftLBError as e:
                return e.code == msg["error"]["code"]
            return False
        return True
    # A client decoder's side of the "invalid" vectors (RUNNER.md).
    d.feed(raw)
    if v["name"] == "truncated":
        return d.next() is None
    if v["name"] in ("length_over_max", "body_not_msgpack", "body_not_a_map"):
        try:
            d.next()
        except ProtocolError:
            return True
        return False
    return isinstance(d.next(), dict)


class Runner:
    def __init__(self) -> None:
        self.client: Client | None = None
        self.stopped: dict[str, threading.Event] = {}

    def _watch(self, service: str, name: str, started: threading.Event, first: list[Any]) -> None:
        stop = self.stopped[name]
        assert self.client is not None
        try:
            for update in self.client.watch(service):
                if stop.is_set():
                    return
                if not started.is_set():
                    first.append(None)
                    started.set()
                emit({"event": "watch", "watch": name, "update": update})
        except BaseException as e:
            if not started.is_set():
                first.append(e)
                started.set()
            elif not stop.is_set():
                emit({"event": "watch_error", "watch": name, "error": error_of(e)})

    def run(self, cmd: dict[str, Any]) -> Any:
        c = self.client
        op = cmd["cmd"]
        if op == "connect":
            addr, timeout = cmd["addr"], float(cmd.get("timeout", 1.0))
            if c is not None:
                c.close()
            self.client = Client(socket_path=addr, timeout=timeout) if addr.startswith("/") else Client(addr=addr, timeout=timeout)
            return {}
        if op == "vectors":
            return vectors(cmd["path"])
        if op in ("exit",):
            return {}
        if c is None:
            raise RuntimeError("no client: send connect first")
        if op == "hello":
            return c.call("hello", versions=cmd.get("versions", [1]), client="softlb-python/0.1")
        if op == "resolve":
            r = c.call("resolve", **_resolve_args(cmd))
            return r
        if op == "report":
            c.report(lease=cmd.get("lease"), ok=cmd.get("ok", True), latency=cmd.get("latency"),
                     service=cmd.get("service"), endpoint=cmd.get("endpoint"))
            return {}
        if op == "services":
            return c.services()
        if op == "endpoints":
            return c.endpoints(cmd["service"])
        if op == "pipeline":
            results = c.call_many([{"op": "resolve", "service": cmd["service"], "lease": False}] * int(cmd["n"]))
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            return [r["id"] for r in results]
        if op == "bench":
            c.resolve(cmd["service"], lease=False)
            t0 = time.perf_counter()
            for _ in range(int(cmd["n"])):
                c.resolve(cmd["service"], lease=False)
            return {"seconds": time.perf_counter() - t0}
        if op == "watch":
            name = cmd["name"]
            started, first = threading.Event(), []
            self.stopped[name] = threading.Event()
            threading.Thread(target=self._watch, args=(cmd["service"], name, started, first), daemon=True).start()
            started.wait()
            if first and first[0] is not None:
                raise first[0]
            return {}
        if op == "unwatch":
            # The blocking watch cannot be interrupted from another thread: stop printing;
            # its connection ends with the runner.
            ev = self.stopped.pop(cmd["name"], None)
            if ev is not None:
                ev.set()
            return {}
        if op == "set_timeout":
            c.timeout = float(cmd["timeout"])
            return {}
        if op == "close":
            for ev in self.stopped.values():
                ev.set()
            c.close()
            return {}
        raise ValueError(f"unknown command {op!r}")


def _resolve_args(cmd: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {"service": cmd["service"]}
    if cmd.get("key") is not None:
        args["key"] = cmd["key"]
    if cmd.get("tags"):
        args["tags"] = cmd["tags"]
    if cmd.get("lease", True) is False:
        args["lease"] = False
    return args


def main() -> int:
    runner = Runner()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
        except ValueError as e:
            emit({"seq": None, "ok": False, "error": {"code": "CLIENT", "message": f"bad command line: {e}"}})
            continue
        try:
            emit({"seq": cmd.get("seq"), "ok": True, "result": runner.run(cmd)})
        except BaseException as e:  # every failure is a reply, never a crash
            emit({"seq": cmd.get("seq"), "ok": False, "error": error_of(e)})
        if cmd.get("cmd") == "exit":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
