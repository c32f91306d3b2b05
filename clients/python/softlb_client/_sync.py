"""The blocking client: one reused connection, per-call timeouts, bounded reconnects.

Resilience rules (docs/PROTOCOL.md §Clients):
- A connection closed by the agent before answering (a restart, an upgrade; also a fresh
  connection a stopping agent accepted and then closed idle) is retried once, transparently:
  the request had not been answered, and every op is safe to repeat.
- Connecting is retried with exponential backoff (5 ms doubling, within the call's timeout),
  so a caller racing an agent restart waits briefly instead of failing.
- A timeout drops the connection (late answers would otherwise be read by the next call).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator

from ._args import report_args, resolve_args
from ._codec import RECV_SIZE, Decoder, encode, result_of
from ._errors import AgentUnavailable, ProtocolError, Timeout
from ._paths import default_socket_path, parse_addr
from ._types import Resolved

#: Worth retrying within the call's timeout: the agent is (re)starting, or its listen
#: backlog is full for a moment (a Unix socket answers EAGAIN then).
_RETRYABLE_CONNECT = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BlockingIOError)
_CLOSED = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class _ConnectionClosed(Exception):
    pass


class Client:
    """Talk to the agent on its Unix socket (default) or loopback port (`addr="127.0.0.1:7070"`).

    Thread-safe: calls are serialised on one connection. For high fan-out, use one client
    per thread, or pipeline with `call_many`.
    """

    def __init__(self, socket_path: str | None = None, addr: str | None = None, timeout: float = 1.0) -> None:
        if addr:
            host, port = parse_addr(addr)
            self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._target = (host, port)
            self._where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        else:
            self._family, self._target = socket.AF_UNIX, socket_path or default_socket_path()
            self._where = self._target
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._dec = Decoder()
        self._next_id = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    def _connect(self, deadline: float) -> socket.socket:
        delay = 0.005
        while True:
            s = socket.socket(self._family, socket.SOCK_STREAM)
            try:
                s.settimeout(max(0.001, deadline - time.monotonic()))
                s.connect(self._target)
                if self._family != socket.AF_UNIX:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return s
            except _RETRYABLE_CONNECT as e:
                s.close()
                if time.monotonic() + delay >= deadline:
                    raise AgentUnavailable(f"cannot connect to the softlb agent at {self._where}: {e}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
            except socket.timeout:
                s.close()
                raise Timeout(f"connecting to {self._where} timed out") from None
            except OSError as e:
                s.close()
                raise AgentUnavailable(f"cannot connect to the softlb agent at {self._where}: {e}") from None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._dec = Decoder()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _exchange(self, frames: bytes, ids: list[int], deadline: float) -> dict[int, dict[str, Any]]:
        """Send frames, read until every id has an answer. Raises _ConnectionClosed when the
        connection died before any answer arrived (the retry-once case)."""
        s = self._sock
        assert s is not None
        try:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            s.sendall(frames)
        except _CLOSED:
            raise _ConnectionClosed() from None
        except socket.timeout:
            raise Timeout(f"the agent did not take the request within {self.timeout}s") from None
        answers: dict[int, dict[str, Any]] = {}
        want = set(ids)
        while want:
            msg = self._next_message(s, deadline, mid_answer=bool(answers))
            rid = msg.get("id")
            if rid in want:
                want.discard(rid)
                answers[rid] = msg
            elif rid is None and "error" in msg:
                result_of(msg)  # a frame-level error: raise it
        return answers

    def _next_message(self, s: socket.socket, deadline: float, mid_answer: bool) -> dict[str, Any]:
        dec = self._dec
        while True:
            msg = dec.next()
            if msg is not None:
                return msg
            try:
                s.settimeout(max(0.001, deadline - time.monotonic()))
                data = s.recv(RECV_SIZE)
            except socket.timeout:
                raise Timeout(f"no answer from the agent within {self.timeout}s") from None
            except _CLOSED:
                data = b""
            if not data:
                if mid_answer:
                    raise AgentUnavailable("the agent closed the connection mid-answer")
                raise _ConnectionClosed()
            dec.feed(data)

    def _round_trip(self, requests: list[dict[str, Any]], timeout: float | None) -> list[dict[str, Any]]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._lock:
            ids = []
            for r in requests:
                self._next_id = (self._next_id + 1) & 0x7FFFFFFF
                r["id"] = self._next_id
                ids.append(self._next_id)
            frames = b"".join(encode(r) for r in requests)
            for attempt in (0, 1):
                if self._sock is None:
                    self._sock = self._connect(deadline)
                try:
                    answers = self._exchange(frames, ids, deadline)
                    return [answers[i] for i in ids]
                except _ConnectionClosed:
                    # Even a connection made for this call: a stopping agent may have
                    # accepted it and then closed it, idle, while draining.
                    self._drop()
                    if attempt:
                        raise AgentUnavailable("the agent closed the connection") from None
                except BaseException:
                    self._drop()
                    raise
            raise AssertionError("unreachable")

    # ------------------------------------------------------------------ the API

    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """One request; returns its result or raises SoftLBError with the agent's code."""
        args["op"] = op
        return result_of(self._round_trip([args], timeout)[0])

    def call_many(self, requests: list[dict[str, Any]], timeout: float | None = None) -> list[Any]:
        """Pipeline several requests in one write; results (or SoftLBError instances) in order."""
        out: list[Any] = []
        for msg in self._round_trip([dict(r) for r in requests], timeout):
            try:
                out.append(result_of(msg))
            except Exception as e:
                out.append(e)
        return out

    def hello(self) -> dict[str, Any]:
        return self.call("hello", versions=[1], client="softlb-python/0.1")

    def resolve(
        self, service: str, key: str | bytes | None = None, tags: list[str] | None = None,
        lease: bool = True, timeout: float | None = None,
    ) -> Resolved:
        args = resolve_args(service, key, tags, lease)
        return Resolved.from_result(self.call("resolve", timeout, **args))

    def report(
        self, lease: int | None = None, ok: bool = True, latency: float | None = None,
        service: str | None = None, endpoint: str | None = None,
    ) -> None:
        args = report_args(lease, ok, latency, service, endpoint)
        self.call("report", **args)

    def services(self) -> list[dict[str, Any]]:
        return self.call("services")

    def endpoints(self, service: str) -> dict[str, Any]:
        return self.call("endpoints", service=service)

    def watch(self, service: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield the service's endpoint set now and after every change, on a connection of
        its own. `timeout` bounds each wait (None: wait forever).

        An agent restart does not end the stream: the watch reconnects (retrying, at most
        once a second, for as long as it takes) and resumes, yielding the set again only if
        it differs from the last one yielded. It raises AgentUnavailable only when there is
        no agent to start with.
        """
        last: Any = None
        delay = 0.05
        started = False
        while True:
            try:
                sock = self._connect(time.monotonic() + self.timeout)
            except AgentUnavailable:
                if not started:
                    raise  # no agent at all: say so at once
                # The agent is restarting (or upgrading): a watch is long-lived, so keep
                # trying, backing off to one attempt a second.
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            started = True
            delay = 0.05
            try:
                for update in self._watch_stream(sock, service, timeout):
                    if _watch_view(update) != last:
                        last = _watch_view(update)
                        yield update
            except _ConnectionClosed:
                continue  # the agent went away: reconnect and resume
            finally:
                sock.close()

    @staticmethod
    def _watch_stream(sock: socket.socket, service: str, timeout: float | None) -> Iterator[dict[str, Any]]:
        dec = Decoder()
        try:
            sock.sendall(encode({"id": 1, "op": "watch", "service": service}))
        except _CLOSED:
            raise _ConnectionClosed() from None
        sock.settimeout(timeout)
        while True:
            msg = dec.next()
            if msg is None:
                try:
                    data = sock.recv(RECV_SIZE)
                except socket.timeout:
                    raise Timeout("no watch update in time") from None
                except _CLOSED:
                    data = b""
                if not data:
                    raise _ConnectionClosed()
                dec.feed(data)
                continue
            if msg.get("id") != 1:
                raise ProtocolError(f"unexpected frame on a watch connection: {msg!r}")
            yield result_of(msg)


def _watch_view(update: Any) -> Any:
    """What a watcher cares about: the set and its state, not counters that restart with
    the agent (version) or move with the clock (age)."""
    if not isinstance(update, dict):
        return update
    return {k: v for k, v in update.items() if k not in ("version", "age")}
