"""The IPC server: wire protocol v1 on the Unix socket and the loopback port.

Accepting, connection caps, idle timeouts and the drain are agent/listeners.py's; this module
is the per-connection handler.

Why raw non-blocking sockets instead of trio.SocketStream: a resolve is a ~40-byte request
answered from memory, so the cost per call is all overhead. The reader tries `recv` first and
parks in `wait_readable` only when there is nothing to read, answers every complete frame in
the buffer with a single `send` (pipelined requests cost one syscall per batch), and, when one
connection is the only one talking, spins on `recv` for `busy_poll` seconds after answering:
on small VMs a cross-core wakeup costs ~30 µs, more than the whole resolve (docs/BENCHMARKS.md).

Fair sharing of the loop: a reader that always finds data never parks, and trio only switches
tasks at a checkpoint. So each connection answers at most MAX_TURN_FRAMES frames (or
MAX_TURN_BYTES bytes of answers) and then yields (`checkpoint`) before reading on; the frames
left in its buffer wait for its next turn and nothing more is read meanwhile, so one client's
pipeline costs the others at most one turn (~1 ms), and the watchdog pings keep going. A
sequential caller parks between requests anyway and never reaches the bound.

Watches: at most `max_watches_per_connection` per connection and `max_watches` in all. On a
change, the service's description is encoded once (not once per watch) and the woken watches
send it WATCH_SLICE per scheduler pass (a `Turns` gate over every watch of every connection,
round robin by peer), so a
service with thousands of watchers changing costs every other client at most a slice's worth
of sends at a time; a closed connection's watches end WATCH_END_SLICE per turn.

Error policy: a frame that is not a msgpack map, an unknown op or a bad argument gets an error
answer and the connection goes on; a length prefix over max_frame gets FRAME_TOO_LARGE and the
connection is closed (framing is lost). A connection's failure never touches another's.

Stopping (`draining` set): accepting stops at once, each connection is closed as soon as it has
no request left unanswered, streaming watches end, and resolves still waiting on a catalog
source get their answer first.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import weakref
from typing import TYPE_CHECKING, Any

import msgpack
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
    resolve_frame,
    respond,
)

from . import listeners
from .listeners import ConnectionBudget, ConnectionLimits
from .proxy.figures import with_proxy_figures
from .turns import FRAMES_PER_UNIT, Turns

if TYPE_CHECKING:
    from .runtime import Runtime

REQUEST, NONE = LeaseScope.REQUEST, LeaseScope.NONE

log = logging.getLogger("softlb.ipc")

RECV_SIZE = 65536
#: A connection must be the only one sending for this long before its reader may spin:
#: with several busy clients, spinning on one would starve the others' epoll wakeups.
SOLO_WINDOW = 0.002
#: A peer that reads nothing of an answer for this long is hung up on.
WRITE_STALL_TIMEOUT = 30.0
#: Frames one connection answers per turn before it yields to the others: ~1 ms of work, and
#: above the pipelined benchmark's batch of 100 so that one costs no extra turn (at 64 the
#: pipelined rate fell 14-23%). A turn is also cut to the units its pass has left.
MAX_TURN_FRAMES = 64
#: What a request answered by a task of its own (a watch, a resolve waiting on a source)
#: counts for in a turn, in frames: the task's first step runs in the next pass, outside any
#: turn, so 250 watches in one write made 250 task steps there (~15 ms here).
SPAWN_FRAMES = 32
#: Answer bytes per turn (an `endpoints` listing of a big service is one frame, but large).
MAX_TURN_BYTES = 256 * 1024
#: Requests waiting on a catalog source (resolves of a service being fetched) per connection.
MAX_DEFERRED = 256
#: Watch updates sent per scheduler pass, over all connections: ~60 us each here under load,
#: so a pass of them is ~1 ms (at 64, passes of 10-15 ms while 10,000 watches took an
#: update). 10,000 watches of one service take ~600 passes per change; changes meanwhile
#: coalesce.
WATCH_SLICE = 16
#: Watches of a closed connection ended per turn.
WATCH_END_SLICE = 16


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


class Connection:
    """One client connection: its socket, writer lock, streaming watches and deferred ops."""

    _ids = 0

    def __init__(self, sock: socket.socket, source: str, lc: listeners.Connection | None = None) -> None:
        Connection._ids += 1
        self.id = lc.id if lc is not None else -Connection._ids
        self.sock = sock
        self.source = source
        self.lc = lc
        self._busy = False
        #: Senders waiting for the one sending now; made by the first to wait (most
        #: connections never have two senders: a connection flood makes thousands).
        self._lot: trio.lowlevel.ParkingLot | None = None
        self.watches: dict[Any, _Watch] = {}
        self.deferred = 0
        self.watch_slots = 0
        #: Set when the reader has ended during a drain: a watch that starts now must not.
        self.closing = False
        #: Requests to answer in tasks of their own, waiting for the connection's nursery.
        self.to_spawn: list[Any] = []

    async def send(self, data: bytes) -> None:
        """Send all of `data`, in order with any other sender on this connection."""
        while self._busy:
            if self._lot is None:
                self._lot = trio.lowlevel.ParkingLot()
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
                        if self.lc is not None:
                            # In the lot, as readers wait: connections whose peers stopped
                            # reading, closed together, are let go a budget per pass.
                            await self.lc.wait_writable()
                        else:
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
            if self._lot is not None:
                self._lot.unpark_all()


def peer_source(sock: socket.socket) -> str:
    """Who is calling, for affinity policies: "uid:pid" on a Unix socket, the IP on TCP."""
    return listeners.Peer.of(sock).source


def _goodbye(why: str) -> bytes:
    return ServerConnection.send_error(None, ErrorCode.UNAVAILABLE, f"connection refused: {listeners.refusal_text(why)}")


async def serve_listener(
    rt: Runtime, listener: socket.socket, *, draining: trio.Event | None = None,
    budget: ConnectionBudget | None = None, name: str = "ipc",
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve wire protocol v1 on `listener` until `draining` is set (see the module doc and
    agent/listeners.py). Listeners that share `budget` share its connection caps."""
    if budget is None:
        budget = ConnectionBudget(ConnectionLimits.from_config(rt.config), rt.stats)
    spin = _Spin()

    async def handler(lc: listeners.Connection) -> None:
        await _run_connection(rt, lc, spin)

    await listeners.serve_listener(listener, handler, budget, name=name, draining=draining,
                                   refuse=_goodbye, lot=rt.lot, task_status=task_status)


async def _run_connection(rt: Runtime, lc: listeners.Connection, spin: _Spin) -> None:
    conn = Connection(lc.sock, lc.peer.source, lc)
    proto = ServerConnection(rt.config.max_frame)
    log.debug("connection %d from %s", conn.id, lc.peer)
    try:
        # A nursery for the connection's own tasks (watches, resolves waiting on a source)
        # only once it asks for one: most connections never do, and opening and closing
        # one was a fifth of what a connection's start and end cost (the connection flood).
        if not await _read_loop(rt, conn, lc, spin, None, proto):
            return
        async with trio.open_nursery() as nursery:
            for req in conn.to_spawn:
                nursery.start_soon(_handle_deferred, rt, conn, req)
            conn.to_spawn.clear()
            try:
                await _read_loop(rt, conn, lc, spin, nursery, proto)
            finally:
                if lc.draining:  # watches end; deferred resolves still answer
                    conn.closing = True
                    for w in list(conn.watches.values()):
                        w.stop()
                else:
                    try:
                        await _end_watches(rt, conn)
                    finally:
                        nursery.cancel_scope.cancel()
    except Exception as e:
        # Whatever ends one connection, a peer hanging up or a bug, ends only that one.
        # (Cancellation is a BaseException and still propagates: shutdown stays one cancel.)
        peer_gone = _only(e, OSError)
        log.log(logging.DEBUG if peer_gone else logging.ERROR, "connection %d (%s) ended: %r",
                conn.id, lc.peer, e, exc_info=not peer_gone)
        if not peer_gone:
            rt.stats.errors["INTERNAL"] += 1


async def _end_watches(rt: Runtime, conn: Connection) -> None:
    """End a closed connection's watches WATCH_END_SLICE per turn. Cancelling them all at
    once ran every watch task in one pass: 250 per connection, 2,000 steps (100 ms here) in
    one pass when a few such connections closed together."""
    watches = list(conn.watches.values())
    turns = rt.turns
    for i in range(0, len(watches), WATCH_END_SLICE):
        for w in watches[i:i + WATCH_END_SLICE]:
            w.stop()
        if turns is not None:
            turns.spend(WATCH_END_SLICE * FRAMES_PER_UNIT // 8)  # a watch's end: ~1/8 unit
            await turns.wait(conn.source)
        else:
            await trio.lowlevel.checkpoint()


def _only(e: BaseException, kind: type[BaseException]) -> bool:
    if isinstance(e, BaseExceptionGroup):
        return all(_only(x, kind) for x in e.exceptions)
    return isinstance(e, kind)


async def _read_loop(rt: Runtime, conn: Connection, lc: listeners.Connection, spin: _Spin,
                     nursery: trio.Nursery | None, proto: ServerConnection) -> bool:
    """Serve the connection until it ends (False), or, without a nursery, until a request
    needs a task of its own (True: `conn.to_spawn` holds it; call again with a nursery)."""
    sock = conn.sock
    engine = rt.engine
    source = conn.source
    busy_poll = rt.config.busy_poll
    clock = trio.current_time
    perf = time.perf_counter
    stats = rt.stats
    recv = sock.recv
    checkpoint = trio.lowlevel.checkpoint
    turns = rt.turns
    # Spin only while it pays: after a spin that found nothing, wait in epoll and spin again
    # only if the next request came back within the spin window (a caller in a tight loop).
    may_spin = False
    spin_ok = True
    answered_at = 0.0
    # Work done since this task last yielded; and whether the buffer still holds frames
    # left for the next turn (then nothing more is read until they are answered).
    turn_frames = turn_bytes = 0
    streak = 0  # turns in a row without parking: a client pipelining flat out
    backlog = nursery is not None  # called again: answer what is buffered first
    data = b""
    while True:
        if not backlog:
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
                    if lc.draining and not proto.buffered:
                        return False  # between requests: closing now loses nothing
                    await lc.wait_readable()  # in the lot: a flood of wakeups waits its peer's turn
                    turn_frames = turn_bytes = streak = 0
                    # The gap includes the epoll wakeup itself (~30 µs here), hence the 2x.
                    spin_ok = perf() - answered_at <= 2 * busy_poll
                    continue
            proto.receive_data(data)
            if not data:
                return False
        out = []
        now = clock()
        lc.last_active = now
        pick = engine.pick
        send_error = proto.send_error
        backlog = False
        size = n = 0
        # A turn answers at most what its pass has left (the others woken in the same pass
        # spent theirs first), and never more than MAX_TURN_FRAMES: a pipelined batch is
        # split across turns only when the pass is busy or the batch is bigger than that.
        # (`room` is at least one unit, FRAMES_PER_UNIT frames: asked only past those, so a
        # caller's single request does not pay for the question.)
        limit = MAX_TURN_FRAMES if turns is None else FRAMES_PER_UNIT
        asked = turns is None
        while True:
            if n >= limit or size >= MAX_TURN_BYTES:
                if not asked:
                    asked = True
                    limit = min(MAX_TURN_FRAMES, turns.room() * FRAMES_PER_UNIT)
                if n >= limit or size >= MAX_TURN_BYTES:
                    backlog = True
                    break
            ev = proto.next_event()
            if ev is NEED_DATA or ev is CLOSED:
                break
            n += 1
            stats.requests += 1
            t = type(ev)
            if t is Resolve:
                # The hot path, straight to the engine (what `respond` does for a Resolve).
                try:
                    r = pick(ev.service, now, key=ev.key, tags=ev.tags, source=source,
                             scope=REQUEST if ev.lease else NONE)
                except RequestError as e:
                    stats.errors[e.code.value] += 1
                    out.append(send_error(ev.id, e.code, e.message))
                    continue
                if type(r) is Pick:
                    frame = resolve_frame(ev.id, r.wire, r.lease, r.panic, r.stale, r.age)
                    out.append(frame)
                    size += len(frame)
                    continue
                frame = _defer(rt, conn, ev, nursery)  # Pending: a source is fetching it
            elif t is Rejected:
                stats.errors[ev.code.value] += 1
                hint = http_hint(data) if ev.fatal else None
                out.append(proto.send_error(ev.id, ev.code, ev.message) if hint is None else hint)
                if ev.fatal:  # framing lost
                    await conn.send(b"".join(out))
                    return False
                continue
            elif t is Watch or t is Unwatch:
                frame = _defer(rt, conn, ev, nursery)
            elif t is Endpoints and _is_big(engine, ev.service) and not _proxied(rt, ev.service):
                # Answered in order (what came before first), but described off the loop:
                # this connection waits, the others do not.
                if out:
                    await conn.send(b"".join(out))
                    out = []
                frame = await _big_listing(rt, ev)
            else:
                try:
                    r = respond(engine, ev, now, source)
                except RequestError as e:
                    stats.errors[e.code.value] += 1
                    out.append(proto.send_error(ev.id, e.code, e.message))
                    continue
                rt_ = type(r)
                if rt_ is Pick:
                    frame = proto.send_pick(ev.id, r)
                elif rt_ is Pending:
                    frame = _defer(rt, conn, ev, nursery)
                elif rt_ is Reported:
                    rt.dispatch(r.changes)
                    frame = proto.send_result(ev.id, {})
                else:
                    if rt_ is dict and type(ev) is Endpoints and rt.proxy_figures is not None:
                        r = with_proxy_figures(rt.proxy_figures, ev.service, r)
                    frame = proto.send_result(ev.id, r)
            if frame is None:  # a task will answer it
                n += SPAWN_FRAMES - 1
                continue
            out.append(frame)
            size += len(frame)
        rt.flush()
        if out:
            await conn.send(out[0] if len(out) == 1 else b"".join(out))
        if conn.to_spawn and nursery is None:
            return True
        turn_frames += n
        turn_bytes += size
        if turns is not None and n >= FRAMES_PER_UNIT:
            turns.spend(n)
        if backlog or turn_frames >= MAX_TURN_FRAMES or turn_bytes >= MAX_TURN_BYTES:
            # This task has had its turn without parking (a pipeline, or a spin that kept
            # finding data): let the others run before reading on.
            stats.turns_yielded += 1
            streak += 1
            if turns is not None and (streak > 1 or not turns.free(source)):
                # Round robin with the others, from the next pass: a pipeline that keeps
                # the connection busy turn after turn goes behind whoever the lot woke
                # meanwhile. (A checkpoint would run it again in the very next pass, ahead
                # of a bystander the lot delivers in that pass: its p50 went 1.3 -> 2 ms.)
                await turns.wait(source)
            else:
                await checkpoint()  # one batch over a turn (the resolve bench's 100): no queue
            turn_frames = turn_bytes = 0
            if backlog:
                continue  # answer what is buffered before reading more
        answered_at = perf()
        may_spin = spin_ok and busy_poll > 0 and spin.allowed(conn.id, answered_at)


def _is_big(engine: Any, service: Any) -> bool:
    b = engine.services.get(service) if isinstance(service, str) else None
    return b is not None and len(b.endpoints) > BIG_LISTING


def _proxied(rt: Runtime, service: str) -> bool:
    """Whether the proxy adds figures to this service's listing (then it is described on
    the loop, with them: the off-loop encoding does not carry them yet)."""
    f = rt.proxy_figures
    return f is not None and bool(f.for_service(service) or service in f.listeners)


async def _big_listing(rt: Runtime, req: Endpoints) -> bytes:
    rid, service = req.id, req.service
    b = rt.engine.services.get(service)
    got = None if b is None else await _hub(rt).packed(rt, service, b, max_age=1.0)
    if got is None:
        return ServerConnection.send_error(rid, ErrorCode.UNKNOWN_SERVICE, f"unknown service \"{service}\"")
    return ok_frame_packed(rid, got[2])


def _defer(rt: Runtime, conn: Connection, req: Request, nursery: trio.Nursery | None) -> bytes | None:
    """Start a task for a request the connection answers itself (watch, a resolve waiting
    on a catalog source), or answer at once: an unwatch, or an error frame when this
    connection already has too many waiting or watching."""
    rid = req.id
    error_frame = ServerConnection.send_error
    if type(req) is Watch:
        cfg = rt.config
        hub = _hub(rt)
        # Counted here, not in the task: a pipeline of watches is answered before any runs.
        if conn.watch_slots >= cfg.max_watches_per_connection:
            rt.stats.watches_refused += 1
            return error_frame(rid, ErrorCode.UNAVAILABLE,
                               f"this connection has {conn.watch_slots} watches, the limit "
                               "(agent.max_watches_per_connection); unwatch some first")
        if hub.count >= cfg.max_watches:
            rt.stats.watches_refused += 1
            return error_frame(rid, ErrorCode.UNAVAILABLE,
                               f"the agent runs {hub.count} watches, the limit (agent.max_watches)")
        hub.count += 1
        conn.watch_slots += 1
    elif type(req) is Unwatch:
        # Answered in line, so a watch pipelined right after it finds the slot free.
        return _unwatch(conn, rid, req.watch)
    else:
        if conn.deferred >= MAX_DEFERRED:
            rt.stats.deferred_refused += 1
            return error_frame(rid, ErrorCode.UNAVAILABLE,
                               f"{conn.deferred} requests on this connection already wait for the catalog source")
    if nursery is None:
        conn.to_spawn.append(req)  # started once the connection has opened its nursery
    else:
        nursery.start_soon(_handle_deferred, rt, conn, req)
    return None


def _unwatch(conn: Connection, rid: Any, target: Any) -> bytes:
    w = conn.watches.pop(target, None) if isinstance(target, (int, str)) and not isinstance(target, bool) else None
    if w is None:
        return ServerConnection.send_error(rid, ErrorCode.BAD_ARGUMENT, f"no watch with id {target!r} on this connection")
    w.stop()
    w.slot.release()
    return ServerConnection.send_result(rid, {})


class _Fanout:
    """A service's watches wait here, not all on the change event: one leader waits on the
    event and, once it fires, hands the others to the hub's gate (`_Hub.gate`, a `Turns`
    with WATCH_SLICE a pass), which lets them go a slice per pass, round robin by peer (uid,
    then process). Waking 10,000 tasks on one event would run them all in a single batch
    (~50 ms here) before trio polls for I/O again; this way every other client is answered
    between slices, and one peer's thousands of watches do not queue another peer's one."""

    __slots__ = ("waiting", "led")

    def __init__(self) -> None:
        #: Followers parked for the next change: task -> its peer key, in arrival order.
        self.waiting: dict[trio.lowlevel.Task, str] = {}
        self.led = False


async def _wait_change(hub: _Hub, service: str, w: _Watch, changed: trio.Event, key: str) -> bool:
    """Return at the next change of `service` (at once if `changed` is set already); True
    if the gate let this watch through already."""
    f = hub.fanout.get(service)
    if f is None:
        f = hub.fanout[service] = _Fanout()
    try:
        with trio.CancelScope() as w.waiting:
            if w.stopped or changed.is_set():
                return False
            if f.led:
                task = trio.lowlevel.current_task()
                f.waiting[task] = key

                def abort(_: object) -> trio.lowlevel.Abort:
                    if f.waiting.pop(task, None) is None:  # handed to the gate meanwhile
                        hub.gate.discard(task, key)
                    return trio.lowlevel.Abort.SUCCEEDED

                await trio.lowlevel.wait_task_rescheduled(abort)
                return True  # let go by the gate
            f.led = True
            try:
                await changed.wait()
            finally:
                f.led = False
        # Here as the leader, or as a follower whose watch was stopped (`stop` cancels the
        # wait): hand the others over only if the change came. (A stopped follower did it
        # unasked: every watch of the service went through the gate for nothing.) Asked of
        # the event, not of how the wait ended: a leader stopped just as the change fired
        # must still pass it on.
        if changed.is_set() and f.waiting:
            # Everyone parked now waits for the gate instead, without waking; those that
            # park meanwhile wait for the next change.
            waiting, f.waiting = f.waiting, {}
            park = hub.gate.park
            for task, k in waiting.items():
                park(task, k)
        return False
    finally:
        w.waiting = None
        if not f.led and f.waiting:
            # Someone must lead the next round: the first follower, let go now.
            task = next(iter(f.waiting))
            del f.waiting[task]
            trio.lowlevel.reschedule(task)
        elif not f.led and not f.waiting and hub.fanout.get(service) is f:
            del hub.fanout[service]


class _WatchGate(Turns):
    """`Turns` for watch senders; its releaser is a system task, started with the hub."""

    _started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            trio.lowlevel.spawn_system_task(self.run, name="softlb-watch-gate")


class _Hub:
    """Per runtime: the watch count, the gate, and each service's description encoded
    once per change."""

    def __init__(self) -> None:
        self.count = 0
        #: Watch senders, WATCH_SLICE a pass, round robin by peer (see _Fanout).
        self.gate = _WatchGate(WATCH_SLICE)
        self.encoded: dict[str, tuple[Any, int, bytes, float]] = {}
        self.fanout: dict[str, _Fanout] = {}

    async def packed(self, rt: Runtime, service: str, b: Any, max_age: float | None = None) -> tuple[Any, int, bytes] | None:
        """(balancer, version, b.describe() msgpack-encoded), encoded once per change of the
        service (every watch of it shares the bytes); None if the service is gone.
        `max_age`: a cached encoding older than this is redone ("age" has moved on).

        A big service (over BIG_LISTING endpoints) is described and encoded in a worker
        thread, one endpoint at a time so the GIL goes back to the loop between them: on the
        loop, 100,000 endpoints took seconds. The thread reads state the loop may change
        meanwhile, so the result is kept only if the service's balancer and version are
        the same afterwards (else it is redone, and after RETRIES on the loop)."""
        now = trio.current_time()
        got = self.encoded.get(service)
        if got is not None and got[0] is b and got[1] == b.version and (max_age is None or now - got[3] <= max_age):
            return got[:3]
        for _ in range(RETRIES if len(b.endpoints) > BIG_LISTING else 0):
            version = b.version
            try:
                body = await trio.to_thread.run_sync(_pack_description, b, now)
            except RuntimeError:  # a dict changed size under the worker: try again
                body = None
            now_b = rt.engine.services.get(service)
            if now_b is None:
                return None
            if now_b is b and b.version == version and body is not None:
                self.encoded[service] = (b, version, body, now)
                return b, version, body
            b = now_b
            now = trio.current_time()
        body = _pack_description(b, now)
        self.encoded[service] = (b, b.version, body, now)
        return b, b.version, body


#: Services with more endpoints than this are described off the loop.
BIG_LISTING = 1000
RETRIES = 3


def _pack_description(b: Any, now: float) -> bytes:
    """_packb(b.describe(now)), the same bytes, but packed one endpoint at a time (one C
    call for a 100,000-entry list would hold the GIL throughout)."""
    d = b.describe(now)
    eps = d.pop("endpoints")
    packer = msgpack.Packer(use_bin_type=True)
    head = packer.pack_map_header(len(d) + 1) + b"".join(packer.pack(k) + packer.pack(v) for k, v in d.items())
    parts = [head, packer.pack("endpoints"), packer.pack_array_header(len(eps))]
    pack = packer.pack
    for e in eps:  # a Python loop: the GIL can change hands between iterations, not in map()
        parts.append(pack(e))
    return b"".join(parts)


_hubs: weakref.WeakKeyDictionary[Any, _Hub] = weakref.WeakKeyDictionary()
_packb = msgpack.Packer(use_bin_type=True).pack
_HEAD_ID = b"\x82" + _packb("id")
_K_RESULT = _packb("result")


def _hub(rt: Runtime) -> _Hub:
    h = _hubs.get(rt)
    if h is None:
        h = _hubs[rt] = _Hub()
        h.gate.start()
    return h


def ok_frame_packed(rid: Any, packed_result: bytes) -> bytes:
    """ok_frame(rid, result) with the result already packed: the same bytes, since the
    map is {"id": rid, "result": result} in that order."""
    body = b"".join((_HEAD_ID, _packb(rid), _K_RESULT, packed_result))
    return len(body).to_bytes(4, "big") + body


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
    """Requests the connection answers in a task of their own: watches, and resolves of
    services a catalog source is still fetching (answered once it has, or UNAVAILABLE)."""
    rid = req.id
    send_error = ServerConnection.send_error
    try:
        try:
            if type(req) is Watch:
                slot = _Slot(_hub(rt), conn)
                try:
                    await _watch(rt, conn, rid, req.service, slot)
                finally:
                    slot.release()
            else:
                assert type(req) is Resolve
                conn.deferred += 1
                try:
                    pick = await rt.pick(req.service, key=req.key, tags=req.tags, source=conn.source,
                                         scope=LeaseScope.REQUEST if req.lease else LeaseScope.NONE)
                finally:
                    conn.deferred -= 1
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

    __slots__ = ("stopped", "waiting", "slot")

    def __init__(self, slot: _Slot) -> None:
        self.slot = slot
        self.stopped = False
        self.waiting: trio.CancelScope | None = None

    def stop(self) -> None:
        self.stopped = True
        if self.waiting is not None:
            self.waiting.cancel()


class _Slot:
    """One watch's place in the per-connection and total counts, given back once."""

    __slots__ = ("hub", "conn", "held")

    def __init__(self, hub: _Hub, conn: Connection) -> None:
        self.hub, self.conn, self.held = hub, conn, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.hub.count -= 1
            self.conn.watch_slots -= 1


async def _watch(rt: Runtime, conn: Connection, rid: Any, service: str, slot: _Slot) -> None:
    if rid in conn.watches:
        await conn.send(ServerConnection.send_error(rid, ErrorCode.BAD_ARGUMENT, f"a watch with id {rid!r} is already running"))
        return
    # Registered before any wait, so a pipelined duplicate id is refused and an unwatch that
    # arrives while the catalog source is still fetching the service finds it.
    w = conn.watches[rid] = _Watch(slot)
    if conn.closing:
        w.stop()  # requested just as the drain closed this connection: end with it
    rt.watchers[service] += 1
    hub = _hub(rt)
    busy = conn.lc.busy() if conn.lc is not None else contextlib.nullcontext()
    try:
        with busy:  # a connection that only watches is not idle
            await _stream(rt, conn, rid, service, w, hub)
    finally:
        if conn.watches.get(rid) is w:
            del conn.watches[rid]
        rt.watchers[service] -= 1
        if rt.watchers[service] <= 0:
            del rt.watchers[service]
            # The end of the last watch counts as a use: an on-demand source keeps the
            # service for its idle timeout from now, as after a resolve.
            rt.engine.mark_used(service, trio.current_time())


async def _stream(rt: Runtime, conn: Connection, rid: Any, service: str, w: _Watch, hub: _Hub) -> None:
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
    admitted = False  # let through by the gate already (handed there by the change's leader)
    # The gate's round robin goes by uid, then by process and service: a hot service's
    # thousands of watches do not queue a quiet one's update, in one process or across.
    gate_key = f"{conn.source}/{service}"
    while not w.stopped:
        changed = rt.change_event(service)
        b = rt.engine.services.get(service)
        if b is None:
            if sent != (None, 0):
                sent = (None, 0)
                await conn.send(ServerConnection.send_result(rid, {"service": service, "version": 0, "removed": True, "endpoints": []}))
        elif sent != (b, b.version):
            if not admitted and not hub.gate.free(gate_key):
                with trio.CancelScope() as w.waiting:  # `stop` ends a wait at the gate too
                    await hub.gate.wait(gate_key)
                w.waiting = None
            # Read again after the wait at the gate: send the newest state (changes while
            # this watch waited coalesce into one update).
            b = rt.engine.services.get(service)
            if b is None or w.stopped:
                admitted = False
                continue
            got = await hub.packed(rt, service, b)
            if got is not None and not w.stopped:
                sent = (got[0], got[1])
                await conn.send(ok_frame_packed(rid, got[2]))
        admitted = await _wait_change(hub, service, w, changed, gate_key)


