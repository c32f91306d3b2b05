"""The DNS front end: `NAME.service.<domain>` for programs that only speak DNS.

Some callers will never link a client: a vendor binary, `psql`, a statically linked Go
program. For them the agent answers DNS on a loopback port (UDP and TCP), and the stub
resolver (systemd-resolved, dnsmasq) forwards the `~softlb` domain to it (docs/DNS.md).
What each question is answered with is agent/dns_answers.py's; this module owns the sockets.

Bounded (a query flood must not starve socket callers; the agent is one trio thread):
- UDP: at most UDP_BUDGET datagrams and UDP_SLICE seconds per wake-up, then back to the
  scheduler, where every other task runs before the loop reads again; what the kernel
  buffer cannot hold is dropped by the kernel. Answers that wait for a catalog source run
  as tasks, at most MAX_PENDING at once (SERVFAIL beyond: the resolver retries).
- TCP: on the shared listener (agent/listeners.py): at most MAX_TCP connections (more are
  closed at once), an idle timeout, the drain; one query in flight per connection; every
  connection's questions are answered by one task under the same budget as UDP's.
"""

from __future__ import annotations

import collections
import errno
import logging
import socket
import time
from functools import partial
from typing import Any

import dns.rcode
import trio

from softlb import ConfigError, ErrorCode

from .dns_answers import Deferred, Responder, fetch
from .listeners import Connection, ConnectionBudget, ConnectionLimits, serve_listener
from .runtime import Runtime

log = logging.getLogger("softlb.dns")

#: The UDP loop answers at most this many datagrams, and for at most UDP_SLICE seconds, per
#: wake-up, then lets every other task run. A repeated query costs ~10 us, a new one (parsed
#: and rendered by dnspython) ~0.3-0.5 ms, so a flood delays a socket caller by about one
#: slice (docs/BENCHMARKS.md, bench/dns.py).
UDP_BUDGET = 64
UDP_SLICE = 0.0005
#: Queries waiting on a catalog source (a Consul service fetched on demand) at once.
MAX_PENDING = 64
#: Each busy connection costs the scheduler a few task steps per question whatever the answer
#: budget, so the cap is what bounds a TCP flood's cost to everyone else (resolvers use a few).
MAX_TCP = 16
#: RFC 7766 asks servers to close idle connections after seconds, not minutes.
TCP_IDLE = 10.0


class _Slot:
    """One TCP question on its way to the answering task, and its answer on the way back."""

    __slots__ = ("wire", "source", "out", "done")

    def __init__(self, wire: bytes, source: str | None) -> None:
        self.wire, self.source = wire, source
        self.out: bytes | Deferred | None = None
        self.done = trio.Event()


# ------------------------------------------------------------------------ serving


class DnsServer:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.responder = Responder(rt)
        self.pending = 0
        #: TCP connections: a budget of their own (resolvers use a few), counted apart.
        self.tcp_budget = ConnectionBudget(
            ConnectionLimits(max_connections=MAX_TCP, max_connections_per_uid=MAX_TCP, idle_timeout=TCP_IDLE,
                             fd_reserve=0),
            rt.stats, counted_as="dns_connections", refused=collections.Counter())
        #: Questions read by TCP connections, for the one task that answers them; each
        #: connection has at most one in flight, so MAX_TCP never blocks a sender.
        self._tcp_queries, self._tcp_queued = trio.open_memory_channel[_Slot](MAX_TCP)

    def _count(self, transport: str, answer: bytes | None) -> None:
        key = f"{transport}:{dns.rcode.to_text(answer[3] & 0x0F) if answer else 'dropped'}"
        self.rt.stats.dns[key] += 1

    async def serve(self, udp: socket.socket | None, tcp: socket.socket | None, *,
                    draining: trio.Event | None = None,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if udp is not None:
                nursery.start_soon(self._serve_udp, udp, nursery)
            if tcp is not None:
                nursery.start_soon(self._answer_tcp)
                await nursery.start(partial(serve_listener, tcp, self._tcp_conn, self.tcp_budget,
                                            name="dns-tcp", draining=draining, refuse=self._refused))
            task_status.started()

    # -- UDP

    async def _serve_udp(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        sock.setblocking(False)
        while True:
            await trio.lowlevel.wait_readable(sock)
            until = time.perf_counter() + UDP_SLICE
            for _ in range(UDP_BUDGET):
                if time.perf_counter() > until:
                    break
                try:
                    wire, peer = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:  # an ICMP error queued on the socket: not ours to fix
                    log.debug("dns: recvfrom: %s", e)
                    continue
                try:
                    self._udp_query(sock, wire, peer, nursery)
                except Exception:  # answer() guards itself; a bug past it costs one datagram
                    log.exception("dns: a datagram from %s failed", peer)
                    self.rt.stats.errors["INTERNAL"] += 1

    def _udp_query(self, sock: socket.socket, wire: bytes, peer: Any, nursery: trio.Nursery) -> None:
        out = self.responder.answer(wire, peer[0])
        if isinstance(out, Deferred):
            if self.pending >= MAX_PENDING:
                out = self.responder.finish(out, ErrorCode.UNAVAILABLE, peer[0])
            else:
                self.pending += 1  # counted now: the task starts after this batch
                nursery.start_soon(self._udp_later, sock, out, peer)
                return
        self._count("udp", out)
        if out is not None:
            _sendto(sock, out, peer)

    async def _udp_later(self, sock: socket.socket, pending: Deferred, peer: Any) -> None:
        try:
            error = await fetch(self.rt, pending.service)
            out = self.responder.finish(pending, error, peer[0])
        finally:
            self.pending -= 1
        self._count("udp", out)
        _sendto(sock, out, peer)

    # -- TCP

    async def _answer_tcp(self) -> None:
        """Every TCP connection's questions, answered here under the same budget as UDP's:
        32 connections each answering for itself would get 32 turns per scheduler pass."""
        async for slot in self._tcp_queued:
            until = time.perf_counter() + UDP_SLICE
            for _ in range(UDP_BUDGET):
                try:
                    slot.out = self.responder.answer(slot.wire, slot.source, tcp=True)
                except Exception:  # answer() handles its own errors; this is a last resort
                    log.exception("dns: answering over TCP failed")
                    slot.out = None
                slot.done.set()
                if time.perf_counter() > until:
                    break
                try:
                    slot = self._tcp_queued.receive_nowait()
                except trio.WouldBlock:
                    break

    def _refused(self, why: str) -> bytes:
        self.rt.stats.dns["tcp:refused"] += 1
        return b""  # at the cap the connection is closed: a resolver falls back to its next try

    async def _tcp_conn(self, lc: Connection) -> None:
        """One resolver's connection (RFC 7766 framing), one question in flight. Caps, the
        idle close and the drain are the shared listener's (agent/listeners.py)."""
        sock = lc.sock
        buf = bytearray()
        source = lc.peer.source
        try:
            while True:
                while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
                    try:
                        chunk = sock.recv(65537)
                    except BlockingIOError:
                        if lc.draining and not buf:
                            return  # between questions: closing now loses nothing
                        await lc.wait_readable()
                        continue
                    if not chunk:
                        return
                    buf += chunk
                lc.touch()
                n = int.from_bytes(buf[:2], "big")
                wire, buf = bytes(buf[2:2 + n]), buf[2 + n:]
                with lc.busy():
                    out = await self._answer_one(wire, source)
                    self._count("tcp", out)
                    if out is None:
                        continue
                    with trio.move_on_after(TCP_IDLE) as slow:
                        await _send_all(sock, len(out).to_bytes(2, "big") + out)
                    if slow.cancelled_caught:
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _answer_one(self, wire: bytes, source: str | None) -> bytes | None:
        slot = _Slot(wire, source)
        await self._tcp_queries.send(slot)
        await slot.done.wait()
        out = slot.out
        if isinstance(out, Deferred):
            out = self.responder.finish(out, await fetch(self.rt, out.service), source)
        return out


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


def _sendto(sock: socket.socket, data: bytes, peer: Any) -> None:
    try:
        sock.sendto(data, peer)
    except (BlockingIOError, InterruptedError):
        pass  # the send buffer is full: UDP may lose an answer, the resolver asks again
    except OSError as e:
        log.debug("dns: sendto %s: %s", peer, e)


def bind_dns(addr: str) -> tuple[socket.socket, socket.socket]:
    """The UDP and TCP sockets of `HOST:PORT` (port 0: one free port for both)."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(20 if port == "0" else 1):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.bind((host, int(port)))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(128)
            return udp, tcp
        except OSError as e:
            udp.close()
            tcp.close()
            if e.errno != errno.EADDRINUSE:
                raise
    raise ConfigError(f"agent.dns: {addr} is already in use")
