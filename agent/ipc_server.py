"""The IPC server: wire protocol v1 on the Unix socket and the loopback port.

Why raw non-blocking sockets instead of trio.SocketStream: a resolve is a ~40-byte request
answered from memory, so the cost per call is all overhead. The reader tries `recv` first and
parks in `wait_readable` only when there is nothing to read, answers every complete frame in
the buffer with a single `send` (pipelined requests cost one syscall per batch), and, when one
connection is the only one talking, spins on `recv` for `busy_poll` seconds after answering:
on small VMs a cross-core wakeup costs ~30 µs, more than the whole resolve (docs/BENCHMARKS.md).

Error policy: a frame that is not a msgpack map, an unknown op or a bad argument gets an error
answer and the connection goes on; a length prefix over max_frame gets FRAME_TOO_LARGE and the
connection is closed (framing is lost). A connection's failure never touches another's.

Stopping (`draining` set): accepting stops at once (under systemd, connections that arrive
now wait in its socket for the next agent), each connection is closed as soon as it has no
request left unanswered, streaming watches end, and resolves still waiting on a catalog
source get their answer first.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

import trio

from softlb import (
    CLOSED,
    NEED_DATA,
    Endpoints,
    ErrorCode,
    LeaseScope,
    Pending,
    Pick,
    Rejected,
    Reported,
    Request,
    RequestError,
    Resolve,
    ServerConnection,
    Unwatch,
    Watch,
    respond,
)

from .proxy.figures import with_proxy_figures

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("softlb.ipc")

#: Out of file descriptors or buffers: log, back off and keep accepting (trio's own policy).
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
#: Errors about one connection that died before we accepted it (or that a security module
#: refused): skip it and accept the next. Anything else is a broken listener and propagates.
ACCEPT_SKIP_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET}
ACCEPT_BACKOFF = 0.1
RECV_SIZE = 65536
#: A connection must be the only one sending for this long before its reader may spin:
#: with several busy clients, spinning on one would starve the others' epoll wakeups.
SOLO_WINDOW = 0.002
#: A peer that reads nothing of an answer for this long is hung up on.
WRITE_STALL_TIMEOUT = 30.0


class _Spin:
    """Server-wide bookkeeping for the adaptive busy-poll."""

    __slots__ = ("last_conn", "since")

    def __init__(self) -> None:
        self.last_conn = 0
        self.since = 0.0

    def allowed(self, conn_id: int, t: float) -> bool:
        if conn_id != self.last_conn:
            self.last_conn = conn_id
            self.since = t
            return False
        return t - self.since > SOLO_WINDOW


class _Drain:
    """Where the accept loop and the readers park, so a stop can wake them: the accept loop
    to stop, idle readers to close their connection.

    Parking costs a set insert and removal, not a cancel scope: this wraps every wait of
    every connection, and the drain wakes the parked ones with `notify_closing`.
    """

    __slots__ = ("event", "parked")

    def __init__(self, event: trio.Event | None) -> None:
        self.event = event
        self.parked: set[socket.socket] = set()

    @property
    def started(self) -> bool:
        return self.event is not None and self.event.is_set()

    async def wait_readable(self, sock: socket.socket) -> None:
        """Wait for data; return early (nothing read) when the drain starts."""
        parked = self.parked
        parked.add(sock)
        try:
            await trio.lowlevel.wait_readable(sock)
        except trio.ClosedResourceError:
            if not self.started:
                raise
        finally:
            parked.discard(sock)

    async def run(self) -> None:
        assert self.event is not None
        await self.event.wait()
        for sock in list(self.parked):
            trio.lowlevel.notify_closing(sock)


class Connection:
    """One client connection: its socket, decoder, writer lock and streaming watches."""

    _ids = 0

    def __init__(self, sock: socket.socket, source: str) -> None:
        Connection._ids += 1
        self.id = Connection._ids
        self.sock = sock
        self.source = source
        self._busy = False
        self._lot = trio.lowlevel.ParkingLot()
        self.watches: dict[Any, _Watch] = {}
        #: Set when the reader has ended during a drain: a watch that starts now must not.
        self.closing = False

    async def send(self, data: bytes) -> None:
        """Send all of `data`, in order with any other sender on this connection."""
        while self._busy:
            await self._lot.park()
        if not data:
            return
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        if n == len(data):
            return
        self._busy = True
        try:
            view = memoryview(data)[n:]
            while view:
                with trio.move_on_after(WRITE_STALL_TIMEOUT):
                    try:
                        await trio.lowlevel.wait_writable(self.sock)
                    except trio.ClosedResourceError:
                        # The drain wakes parked readers with notify_closing, which wakes a
                        # writer on the same socket too; the socket is closed only after this
                        # connection's tasks end, so finish the frame.
                        continue
                    try:
                        view = view[self.sock.send(view) :]
                    except BlockingIOError:
                        pass
                    continue
                # The peer has read nothing for that long: it holds a task, a socket and
                # buffered answers for no one. Hang up; the reader sees EOF and ends.
                self.sock.shutdown(socket.SHUT_RDWR)
                raise ConnectionAbortedError(f"peer read nothing for {WRITE_STALL_TIMEOUT:.0f}s")
        finally:
            self._busy = False
            self._lot.unpark_all()


def peer_source(sock: socket.socket) -> str:
    """Who is calling, for affinity policies: "uid:pid" on a Unix socket, the IP on TCP."""
    if sock.family == socket.AF_UNIX:
        try:
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return f"{uid}:{pid}"
        except OSError:
            return "unix"
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "tcp"


async def serve_listener(
    rt: Runtime, listener: socket.socket, *, draining: trio.Event | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections until `draining` is set, each in its own task in a nursery this
    call owns; then returns once every connection has drained (see the module doc)."""
    listener.setblocking(False)
    spin = _Spin()
    drain = _Drain(draining)
    async with trio.open_nursery() as nursery:
        if draining is not None:
            nursery.start_soon(drain.run)
        task_status.started()
        while not drain.started:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                await drain.wait_readable(listener)
                continue
            except OSError as e:
                if e.errno in ACCEPT_SKIP_ERRNOS:
                    continue
                if e.errno in ACCEPT_CAPACITY_ERRNOS:
                    log.error("accept failed (%s); retrying in %.1fs", e, ACCEPT_BACKOFF)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                raise
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(_run_connection, rt, sock, spin, drain)


async def _run_connection(rt: Runtime, sock: socket.socket, spin: _Spin, drain: _Drain) -> None:
    conn = Connection(sock, peer_source(sock))
    rt.stats.connections_open += 1
    rt.stats.connections_total += 1
    try:
        async with trio.open_nursery() as nursery:
            try:
                await _read_loop(rt, conn, spin, nursery, drain)
            finally:
                if drain.started:  # watches end; deferred resolves still answer
                    conn.closing = True
                    for w in list(conn.watches.values()):
                        w.stop()
                else:
                    nursery.cancel_scope.cancel()
    except Exception as e:
        # Whatever ends one connection, a peer hanging up or a bug, ends only that one.
        # (Cancellation is a BaseException and still propagates: shutdown stays one cancel.)
        peer_gone = _only(e, OSError)
        log.log(logging.DEBUG if peer_gone else logging.ERROR, "connection %d (%s) ended: %r",
                conn.id, conn.source, e, exc_info=not peer_gone)
        if not peer_gone:
            rt.stats.errors["INTERNAL"] += 1
    finally:
        rt.stats.connections_open -= 1
        sock.close()


def _only(e: BaseException, kind: type[BaseException]) -> bool:
    if isinstance(e, BaseExceptionGroup):
        return all(_only(x, kind) for x in e.exceptions)
    return isinstance(e, kind)


async def _read_loop(rt: Runtime, conn: Connection, spin: _Spin, nursery: trio.Nursery, drain: _Drain) -> None:
    sock = conn.sock
    engine = rt.engine
    proto = ServerConnection(rt.config.max_frame)
    source = conn.source
    busy_poll = rt.config.busy_poll
    clock = trio.current_time
    perf = time.perf_counter
    stats = rt.stats
    recv = sock.recv
    # Spin only while it pays: after a spin that found nothing, wait in epoll and spin again
    # only if the next request came back within the spin window (a caller in a tight loop).
    may_spin = False
    spin_ok = True
    answered_at = 0.0
    while True:
        try:
            data = recv(RECV_SIZE)
        except BlockingIOError:
            data = None
            if may_spin:
                end = perf() + busy_poll
                while perf() < end:
                    try:
                        data = recv(RECV_SIZE)
                        break
                    except BlockingIOError:
                        pass
                if data is None:
                    stats.busy_poll_misses += 1
                else:
                    stats.busy_poll_hits += 1
            if data is None:
                if drain.started and not proto.buffered:
                    return  # between requests: closing now loses nothing
                await drain.wait_readable(sock)
                # The gap includes the epoll wakeup itself (~30 µs here), hence the 2x.
                spin_ok = perf() - answered_at <= 2 * busy_poll
                continue
        proto.receive_data(data)
        if not data:
            return
        out = []
        now = clock()
        while True:
            ev = proto.next_event()
            if ev is NEED_DATA or ev is CLOSED:
                break
            stats.requests += 1
            t = type(ev)
            if t is Rejected:
                stats.errors[ev.code.value] += 1
                hint = http_hint(data) if ev.fatal else None
                out.append(proto.send_error(ev.id, ev.code, ev.message) if hint is None else hint)
                if ev.fatal:  # framing lost
                    await conn.send(b"".join(out))
                    return
                continue
            if t is Watch or t is Unwatch:
                nursery.start_soon(_handle_deferred, rt, conn, ev)
                continue
            try:
                r = respond(engine, ev, now, source)
            except RequestError as e:
                stats.errors[e.code.value] += 1
                out.append(proto.send_error(ev.id, e.code, e.message))
                continue
            t = type(r)
            if t is Pick:
                out.append(proto.send_pick(ev.id, r))
            elif t is Pending:
                nursery.start_soon(_handle_deferred, rt, conn, ev)
            elif t is Reported:
                rt.dispatch(r.changes)
                out.append(proto.send_result(ev.id, {}))
            else:
                if t is dict and type(ev) is Endpoints and rt.proxy_figures is not None:
                    r = with_proxy_figures(rt.proxy_figures, ev.service, r)
                out.append(proto.send_result(ev.id, r))
        rt.flush()
        if out:
            await conn.send(out[0] if len(out) == 1 else b"".join(out))
        answered_at = perf()
        may_spin = spin_ok and busy_poll > 0 and spin.allowed(conn.id, answered_at)


_HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")


def http_hint(data: bytes) -> bytes | None:
    """An HTTP answer for someone who sent an HTTP request to the msgpack port (curl on the
    wrong port): where the HTTP API is, instead of a msgpack error frame that curl shows as
    garbage. None when `data` does not start with an HTTP request line."""
    line = data[:256].split(b"\r\n", 1)[0]
    if not line.startswith(_HTTP_METHODS) or b" HTTP/1." not in line:
        return None
    body = (b"This is softlb's msgpack protocol port (docs/PROTOCOL.md), not HTTP.\n"
            b"The HTTP API is on the admin port (agent.admin / --admin, default 127.0.0.1:7071):\n"
            b"  curl http://127.0.0.1:7071/\n")
    return (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def _handle_deferred(rt: Runtime, conn: Connection, req: Request) -> None:
    """Requests the connection answers in a task of their own: watch/unwatch, and resolves of
    services a catalog source is still fetching (answered once it has, or UNAVAILABLE)."""
    rid = req.id
    send_error = ServerConnection.send_error
    try:
        try:
            if type(req) is Watch:
                await _watch(rt, conn, rid, req.service)
            elif type(req) is Unwatch:
                target = req.watch
                w = conn.watches.pop(target, None) if isinstance(target, (int, str)) and not isinstance(target, bool) else None
                if w is None:
                    await conn.send(send_error(rid, ErrorCode.BAD_ARGUMENT, f"no watch with id {target!r} on this connection"))
                else:
                    w.stop()
                    await conn.send(ServerConnection.send_result(rid, {}))
            else:
                assert type(req) is Resolve
                pick = await rt.pick(req.service, key=req.key, tags=req.tags, source=conn.source,
                                     scope=LeaseScope.REQUEST if req.lease else LeaseScope.NONE)
                await conn.send(ServerConnection.send_pick(rid, pick))
        except RequestError as e:
            rt.stats.errors[e.code.value] += 1
            await conn.send(send_error(rid, e.code, e.message))
    except (ConnectionError, OSError, trio.BrokenResourceError):
        pass
    except Exception as e:
        # A bug behind one request: answer it as INTERNAL and keep the connection.
        log.exception("%s request %r on connection %d failed", type(req).__name__, rid, conn.id)
        rt.stats.errors["INTERNAL"] += 1
        try:
            await conn.send(send_error(rid, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"))
        except (ConnectionError, OSError):
            pass


class _Watch:
    """A running watch stream. `stop` ends it between frames, never inside one: cancelling
    a task in the middle of a send would leave half a frame on the wire, and the next frame
    (the unwatch answer, say) would land inside it."""

    __slots__ = ("stopped", "waiting")

    def __init__(self) -> None:
        self.stopped = False
        self.waiting: trio.CancelScope | None = None

    def stop(self) -> None:
        self.stopped = True
        if self.waiting is not None:
            self.waiting.cancel()


async def _watch(rt: Runtime, conn: Connection, rid: Any, service: str) -> None:
    if rid in conn.watches:
        await conn.send(ServerConnection.send_error(rid, ErrorCode.BAD_ARGUMENT, f"a watch with id {rid!r} is already running"))
        return
    # Registered before any wait, so a pipelined duplicate id is refused and an unwatch that
    # arrives while the catalog source is still fetching the service finds it.
    w = conn.watches[rid] = _Watch()
    if conn.closing:
        w.stop()  # requested just as the drain closed this connection: end with it
    rt.watchers[service] += 1
    try:
        if service not in rt.engine.services:
            with trio.CancelScope() as w.waiting:
                await rt.await_source(service)  # raises RequestError if the source refuses
            if service not in rt.engine.services:
                if not w.stopped:
                    await conn.send(ServerConnection.send_error(rid, ErrorCode.UNKNOWN_SERVICE, f"unknown service \"{service}\""))
                return
        # What was last sent: the balancer object and its version. A service removed and
        # added again is a new balancer whose versions restart, so identity counts too.
        sent: tuple[object, int] | None = None
        while not w.stopped:
            changed = rt.change_event(service)
            b = rt.engine.services.get(service)
            if b is None:
                if sent != (None, 0):
                    sent = (None, 0)
                    await conn.send(ServerConnection.send_result(rid, {"service": service, "version": 0, "removed": True, "endpoints": []}))
            elif sent != (b, b.version):
                sent = (b, b.version)
                await conn.send(ServerConnection.send_result(rid, b.describe(trio.current_time())))
            with trio.CancelScope() as w.waiting:
                if not w.stopped:
                    await changed.wait()
            w.waiting = None
    finally:
        if conn.watches.get(rid) is w:
            del conn.watches[rid]
        rt.watchers[service] -= 1
        if rt.watchers[service] <= 0:
            del rt.watchers[service]
            # The end of the last watch counts as a use: an on-demand source keeps the
            # service for its idle timeout from now, as after a resolve.
            rt.engine.mark_used(service, trio.current_time())
