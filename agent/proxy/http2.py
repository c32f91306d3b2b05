"""http2 mode: h2c with prior knowledge, each stream picked on its own (gRPC's case).

A client's streams are spread over the service's endpoints, each carried on a pooled
upstream HTTP/2 connection to the picked endpoint (many streams share one). Headers,
data and trailers pass through as they come, under both connections' flow control: data
is acknowledged to its sender only once forwarded (handed to the other connection's
socket), so a slow side slows its peer instead of filling memory. A stream ends ok unless
the answer is a 5xx, a gRPC status UNAVAILABLE, or a reset. `grpc-timeout` shortens
request_timeout for its stream. GOAWAY from an upstream moves new streams to another
connection; streams it refused (above its last stream id, or REFUSED_STREAM) are tried
again elsewhere when their request was small enough to keep.

Design, for speed (docs/BENCHMARKS.md, "Where the time goes"): a stream is state, not a
task. Each connection, client-facing or upstream, has one reader task that feeds the
core's sans-I/O `H2Connection` and forwards every event at once to the other connection's,
and one writer task that only runs when the kernel did not take a write whole; writes are
gathered per batch of events (one `send` per connection per wakeup). A stream needs a task of its own
only when its pick must wait (a catalog source still fetching the service) or a new
upstream connection must be opened. Deadlines (request_timeout, grpc-timeout, drain) are
swept by one housekeeping task per client connection instead of a cancel scope per stream.
A client connection remembers what its repeated request heads mean (checked, routed,
rewritten: `_head`), and the clock is read once per step (`_tick`).

Not done, measured (docs/BENCHMARKS.md, "third pass"): an epoll reactor of the listener's
own for these reads, as relay.py has for tcp. For a sequential caller every wakeup is one
trio wait either way (on the socket, or on the reactor's epoll fd, plus its poll), so it
only pays when several connections are ready at once (bench/trio_wake.py).
"""

from __future__ import annotations

import collections
import logging
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import trio

from softlb import (DataReceived, GoawayReceived, H2Connection, H2ConnectionError, H2ErrorCode, H2UsageError,
                    RemoteSettingsChanged, RequestReceived, ResponseReceived, StreamReset, TrailersReceived,
                    WindowUpdated, never_indexed, route)

from .figures import Figures
from .h2headers import malformed_request, malformed_trailers
from .listener import DRAIN_CHECK, Conn, ListenerState, Work
from .picks import Held, NoEndpoint, finish, pick, pick_now, release
from ..turns import Turns
from .upstream import LOCAL_ERRNOS, open_socket

log = logging.getLogger("softlb.proxy")

RECV = 64 * 1024
#: A client's events handled per turn in the agent's pass budget (agent/turns.py), and
#: the units such a slice costs: a gRPC call's request is 4 events (HEADERS, DATA and two
#: WINDOW_UPDATEs), ~70 us of work, and one 64 KiB read can hold a thousand requests.
EVENTS_PER_TURN = 8
SLICE_COST = 2
#: Per-stream and connection receive windows: large enough for bulk on loopback.
WINDOW = 1 << 20
CONN_WINDOW = 16 << 20
#: A request whose body is at most this is kept until answered, so a stream an upstream
#: refused unprocessed can be sent again to another endpoint.
REPLAY_MAX = 64 * 1024
#: Connection-specific headers (RFC 9113 8.2.2) never cross the proxy.
HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
GRPC_UNAVAILABLE = b"14"
GRPC_DEADLINE_EXCEEDED = b"4"

#: MAX_CONCURRENT_STREAMS each connection allows its peer.
MAX_STREAMS = 1000
# Headers are checked once, as a client's request comes in (h2headers: a malformed request
# is the client's error, its stream reset, never forwarded), and passed on as they came. An
# upstream's answer is not checked: the client checks what it receives, and a malformed
# answer is the endpoint's failure either way.

DATA, TRAILERS = 0, 1


def grpc_timeout(value: bytes | None) -> float:
    """Seconds from a `grpc-timeout` header (`100m`, `5S`); inf when absent or malformed."""
    if not value or len(value) < 2 or value[-1:] not in GRPC_UNITS or not value[:-1].isdigit() or len(value) > 9:
        return math.inf
    return int(value[:-1]) * GRPC_UNITS[value[-1:]]


# ------------------------------------------------------------------------ connections

#: Streams whose answer ended during the current step: their verdicts go to the core
#: once the step's writes are out (`flush_all`).
_verdicts: list[Stream] = []
#: Sides with frames queued during the current synchronous step; sent at its end
#: (`flush_all`), so one step's frames for one connection leave in one `send`.
_dirty: list[Side] = []
#: The clock, read once per step (`_tick`, where a step starts: a wakeup of a connection's
#: reader or writer, a stream's task, the housekeeping): a call's stamps (its deadline, its
#: start, its answer, its verdict) were five clock reads a call.
_now = 0.0


def _tick() -> float:
    global _now
    _now = trio.current_time()
    return _now


def _code_name(code: int) -> str:
    try:
        return H2ErrorCode(code).name
    except ValueError:
        return f"0x{code:x}"


class Side:
    """One HTTP/2 connection: its protocol state (`H2Connection`), its socket, the streams
    it carries.

    Writes go straight to the socket while the kernel takes them; what it does not take
    waits in `out` for the writer task, and flow-control acknowledgements of data forwarded
    onto this connection wait with it (`held_acks`): the sender is not told "send more"
    before its bytes have left."""

    __slots__ = ("conn", "sock", "fd", "streams", "blocked", "out", "writing", "kick", "held_acks",
                 "dead", "goaway", "last_used", "on_lost", "is_dirty", "timer", "errors", "heads", "heads_cfg")

    def __init__(self, sock: trio.socket.SocketType, client_side: bool,
                 errors: collections.Counter[tuple[str, str]] | None = None) -> None:
        #: Where a protocol error that ends this connection is counted (ProxyFigures).
        self.errors = errors
        self.conn = H2Connection(client_side, initial_window=WINDOW, connection_window=CONN_WINDOW,
                                 max_concurrent_streams=MAX_STREAMS)
        self.sock = sock
        self.fd = sock.fileno()
        self.streams: dict[int, Stream] = {}
        #: Streams with data for this connection waiting for its peer's windows to open.
        self.blocked: list[Stream] = []
        self.out = bytearray()
        self.writing = False
        self.kick = trio.Event()
        self.held_acks: list[tuple[Side, int, int]] = []
        self.dead = False
        self.goaway = False
        self.last_used = trio.current_time()
        self.on_lost: Callable[[Side], None] | None = None
        self.is_dirty = False
        #: The housekeeping task's sleep (client-facing side): moved up for an earlier deadline.
        self.timer = trio.CancelScope()
        #: Client side: what was made of request heads seen before (`_Head`), for the
        #: config they were read under (a reload routes anew).
        self.heads: dict[tuple[tuple[bytes, bytes], ...], _Head] = {}
        self.heads_cfg: object = None

    def start(self) -> None:
        self.conn.initiate()
        self.dirty()

    def dirty(self) -> None:
        if not self.is_dirty:
            self.is_dirty = True
            _dirty.append(self)

    def flush(self) -> None:
        self.is_dirty = False
        if self.dead:
            return
        data = self.conn.data_to_send()
        if not data:
            return
        if self.writing:
            self.out += data
            return
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.lost()
            return
        if n < len(data):
            self.out += memoryview(data)[n:]
            self.writing = True
            self.kick.set()

    async def write_loop(self) -> None:
        """Send what the kernel did not take at once; then release the held acks."""
        try:
            while not self.dead:
                await self.kick.wait()
                self.kick = trio.Event()
                while self.out and not self.dead:
                    await trio.lowlevel.wait_writable(self.sock)
                    try:
                        n = os.write(self.fd, self.out)
                    except BlockingIOError:
                        continue
                    del self.out[:n]
                self.writing = False
                _tick()
                acks, self.held_acks = self.held_acks, []
                for src, sid, n in acks:
                    src.ack(sid, n)
                flush_all()
        except (OSError, trio.ClosedResourceError):
            _tick()
            self.lost()
            flush_all()

    def ack_for(self, src: Side, sid: int, n: int) -> None:
        """Acknowledge `n` bytes `src` received on `sid` now forwarded onto this connection."""
        if self.writing:
            self.held_acks.append((src, sid, n))
        else:
            src.ack(sid, n)

    def ack(self, sid: int, n: int) -> None:
        if not self.dead and self.conn.ack_data(sid, n):
            self.dirty()

    def reset(self, sid: int, code: int = H2ErrorCode.CANCEL) -> None:
        if not self.dead and self.conn.reset_stream(sid, code):
            self.dirty()

    def close(self) -> None:
        """GOAWAY, sent as far as the kernel takes it, then closed."""
        if not self.dead:
            self.conn.close()
            self.flush()
            self.lost()

    def lost(self) -> None:
        if not self.dead:
            self.dead = True
            self.kick.set()
            self.sock.close()
            # What waited here will never leave: its senders' connection windows reopen.
            acks, self.held_acks = self.held_acks, []
            for src, sid, n in acks:
                src.ack(sid, n)
            if self.on_lost is not None:
                self.on_lost(self)

    def unblock(self) -> None:
        """The peer opened windows: send what waited for them."""
        waiting, self.blocked = self.blocked, []
        for st in waiting:
            if not st.done:
                _pump(st, up=self is st.uside)

    async def read_loop(self, on_events: Callable[[Side, list[Any]], None], turns: Turns | None = None,
                        key: str = "") -> None:
        """Feed the connection from the socket until it closes; each batch of events goes
        to `on_events`. With `turns` (a client's connection: agent/turns.py) a read first
        takes a turn in the pass, and a batch goes on in slices of EVENTS_PER_TURN, a turn
        each: one read can hold a thousand requests."""
        try:
            while True:
                # Wait first, then read: for request and answer the data is rarely there
                # already, and trio's recv would try (EAGAIN), wait, try again and yield.
                await trio.lowlevel.wait_readable(self.sock)
                if self.dead:
                    break
                try:
                    data = os.read(self.fd, RECV)
                except BlockingIOError:
                    continue
                if not data:
                    break
                if turns is not None and not turns.free(key):
                    await turns.wait(key)
                    if self.dead:
                        break  # lost while it waited (a write to it failed): nothing to open for it
                _tick()
                try:
                    events = self.conn.receive_data(data)
                except H2ConnectionError as e:
                    log.info("http2: protocol error from peer: %s", e)
                    if self.errors is not None:
                        peer = "upstream" if self.conn.client_side else "client"
                        self.errors[(peer, _code_name(e.code))] += 1
                    self.flush()  # a GOAWAY saying why is queued
                    break
                try:
                    if turns is None or len(events) <= EVENTS_PER_TURN:
                        on_events(self, events)
                    else:
                        for i in range(0, len(events), EVENTS_PER_TURN):
                            if i:
                                flush_all()
                                if not turns.free(key, SLICE_COST):
                                    await turns.wait(key, SLICE_COST)
                                if self.dead:
                                    break
                                _tick()
                            on_events(self, events[i:i + EVENTS_PER_TURN])
                except Exception:  # a bug here ends this connection, never the listener
                    log.exception("http2: connection ended")
                    break
                finally:
                    flush_all()
                if self.dead:
                    break
        except (OSError, trio.ClosedResourceError):
            pass
        finally:
            _tick()
            self.lost()
            flush_all()


def flush_all() -> None:
    """Send what the step queued, in the order the connections were first written to
    (on a call's way in the upstream's request, on its way out the client's answer), then
    give the core the verdicts of the streams that ended: after the writes, so the
    bookkeeping is not in the answer's way."""
    i = 0
    while i < len(_dirty):  # a flush that loses a connection may queue to others
        _dirty[i].flush()
        i += 1
    _dirty.clear()
    while _verdicts:
        _verdict(_verdicts.pop())


# ------------------------------------------------------------------------ streams


class Stream:
    """One client stream, from its request headers until its answer ended (or failed)."""

    __slots__ = ("state", "conn", "cside", "csid", "service", "headers", "grpc", "deadline", "lf",
                 "held", "ef", "uside", "usid", "work", "t0", "latency", "ok", "answered", "done",
                 "up_q", "down_q", "up_ended", "replay", "replay_size", "attempt", "tried", "starting",
                 "budget", "spawn")

    def __init__(self, state: ListenerState, conn: Conn, cside: Side, csid: int, service: str,
                 headers: Sequence[tuple[bytes, bytes]], grpc: bool, budget: float,
                 spawn: Callable[..., None]) -> None:
        self.state = state
        self.conn = conn
        self.cside = cside
        self.csid = csid
        self.service = service
        self.headers = headers
        self.grpc = grpc
        self.budget = budget
        self.deadline = _now + budget
        #: Starts a task in the client connection's nursery.
        self.spawn = spawn
        self.lf = state.figures.listener(service)
        self.held: Held | None = None
        self.ef: Figures | None = None
        self.uside: Side | None = None
        self.usid = 0
        self.work: Work | None = None
        self.t0 = 0.0
        self.latency: float | None = None
        self.ok = True
        self.answered = False
        self.done = False
        #: Towards the upstream, not yet handed to its connection: [DATA, bytes, flow-controlled
        #: length, end] or [TRAILERS, headers]. Towards the client likewise.
        self.up_q: deque[list[Any]] = deque()
        self.down_q: deque[list[Any]] = deque()
        self.up_ended = False
        #: The request so far while at most REPLAY_MAX (None once larger): to resend a
        #: stream an upstream refused unprocessed.
        self.replay: list[list[Any]] | None = []
        self.replay_size = 0
        self.attempt = 0
        self.tried: list[str] = []
        #: Set while a task picks or connects for this stream (cancelled at its deadline).
        self.starting: trio.CancelScope | None = None


class _DrainDeadline:
    """What `ListenerState.check_drain` moves for a stream whose endpoint is leaving (the
    housekeeping ends the stream when it passes): a stream has no task to cancel, so no
    trio cancel scope either."""

    __slots__ = ("deadline",)

    def __init__(self) -> None:
        self.deadline = math.inf

    def cancel(self) -> None:
        pass


def _forwarded(headers: Iterable[tuple[bytes, bytes]], peer: str) -> list[tuple[bytes, bytes]]:
    """The request's headers (already checked free of connection-specific ones) with the
    client's address appended to X-Forwarded-For."""
    out = []
    xff = None
    for h in headers:
        if h[0] == b"x-forwarded-for":
            xff = h[1]
        else:
            out.append(h)
    out.append((b"x-forwarded-for", xff + b", " + peer.encode() if xff else peer.encode()))
    return out


@dataclass(frozen=True, slots=True)
class _Head:
    """What a well-formed request head means on one client connection: where it goes, and
    the head sent upstream (X-Forwarded-For added)."""

    service: str
    grpc: bool
    budget: float
    forwarded: tuple[tuple[bytes, bytes], ...]


#: Request heads remembered per client connection. A gRPC channel sends the same head call
#: after call (grpcio rounds a deadline's `grpc-timeout`: `10100m` every call of a 10 s one;
#: a head that differs each time is read afresh each time, at the cost of one lookup).
HEADS_KEPT = 16


def _read_head(state: ListenerState, conn: Conn, key: tuple[tuple[bytes, bytes], ...]) -> _Head | str:
    """A request head checked, routed and rewritten; or why it is malformed."""
    why = malformed_request(key)
    if why is not None:
        return why
    cfg = state.config
    authority = path = ctype = timeout = None
    for n, v in key:
        if n == b":authority" or (n == b"host" and authority is None):
            authority = v
        elif n == b":path":
            path = v
        elif n == b"content-type":
            ctype = v
        elif n == b"grpc-timeout":
            timeout = v
    service = state.service
    if cfg.routes:
        service = route(cfg.routes, state.service, (authority or b"").decode("latin-1"),
                        (path or b"/").decode("latin-1"))
    budget = cfg.request_timeout if timeout is None else min(cfg.request_timeout, grpc_timeout(timeout))
    return _Head(service, (ctype or b"").startswith(b"application/grpc"), budget,
                 tuple(_forwarded(key, conn.peer_ip)))


def _head(state: ListenerState, conn: Conn, cside: Side, headers: list[tuple[bytes, bytes]]) -> _Head | str:
    """`_read_head`, remembered per connection: a repeated head is one dict lookup."""
    key = tuple(headers)
    if cside.heads_cfg is not state.config:
        cside.heads_cfg = state.config
        cside.heads.clear()
    head = cside.heads.get(key)
    never = never_indexed(key)  # an equal head, but its never-indexed fields go on as such
    if head is not None and not never:
        return head
    head = _read_head(state, conn, key)
    if type(head) is _Head and not never:
        if len(cside.heads) >= HEADS_KEPT:
            cside.heads.clear()
        cside.heads[key] = head
    return head


def _request(state: ListenerState, conn: Conn, cside: Side, ev: RequestReceived,
             spawn: Callable[..., None]) -> None:
    sid = ev.stream_id
    if cside.dead:
        return  # the client is gone: nothing is opened for it (its streams were dropped)
    if state.closing:
        cside.reset(sid, H2ErrorCode.REFUSED_STREAM)
        return
    head = _head(state, conn, cside, ev.headers)
    if type(head) is str:
        log.info("http2 %s: malformed request from %s: %s", state.service, conn.peer_ip, head)
        cside.reset(sid, H2ErrorCode.PROTOCOL_ERROR)
        return
    assert type(head) is _Head
    state.figures.listener(state.service).requests += 1
    st = Stream(state, conn, cside, sid, head.service, head.forwarded, head.grpc, head.budget, spawn)
    cside.streams[sid] = st
    if st.deadline < cside.timer.deadline:
        cside.timer.deadline = st.deadline
    if ev.end_stream:
        st.up_q.append([DATA, b"", 0, True])
        st.replay.append([DATA, b"", 0, True])  # type: ignore[union-attr]
    _begin(st, spawn)


def _begin(st: Stream, spawn: Callable[..., None]) -> None:
    """Pick and open the stream upstream at once when no wait is needed, else in a task."""
    state = st.state
    key = f"{st.conn.peer_ip}#retry{st.attempt}" if st.attempt else None
    try:
        held = pick_now(state.rt, st.service, source=st.conn.peer_ip, key=key, now=_now)
    except NoEndpoint as e:
        _fail(st, 503, GRPC_UNAVAILABLE, f"no endpoint for {st.service}: {e.message}")
        return
    if held is not None:
        uside = _upstreams(state).find((held.endpoint.address, held.endpoint.port))
        if uside is not None:
            _open(st, held, uside)
            return
    st.starting = trio.CancelScope()
    spawn(_begin_slowly, st, held)


async def _begin_slowly(st: Stream, held: Held | None) -> None:
    """The pick waits for a catalog source, or the endpoint needs a new connection; a
    failed connect is reported and another endpoint tried, `retries` more times."""
    state = st.state
    cfg = state.config
    figures = state.figures
    assert st.starting is not None
    try:
        with st.starting:
            while True:
                if held is None:
                    key = f"{st.conn.peer_ip}#retry{st.attempt}" if st.attempt else None
                    held = await pick(state.rt, st.service, source=st.conn.peer_ip, key=key)
                ep = held.endpoint
                t0 = trio.current_time()
                try:
                    uside = await _upstream(state, held)
                except (OSError, trio.TooSlowError) as e:
                    if isinstance(e, OSError) and e.errno in LOCAL_ERRNOS:
                        release(state.rt, held)
                        raise Failed(f"{st.service}: cannot open a socket: {e.strerror}") from None
                    finish(state.rt, held, ok=False, latency=trio.current_time() - t0)
                    st.lf.failures += 1
                    figures.endpoint(st.service, ep.id).failures += 1
                    st.tried.append(ep.id)
                    held = None
                    if st.attempt >= cfg.retries:
                        raise Failed(f"{st.service}: no endpoint accepted a connection "
                                     f"(tried {', '.join(st.tried)})") from None
                    st.attempt += 1
                    st.lf.retries += 1
                    continue
                except BaseException:
                    release(state.rt, held)
                    raise
                break
    except NoEndpoint as e:
        _tick()
        _fail(st, 503, GRPC_UNAVAILABLE, f"no endpoint for {st.service}: {e.message}")
    except Failed as e:
        _tick()
        _fail(st, 502, GRPC_UNAVAILABLE, str(e))
    else:
        _tick()
        if st.starting.cancelled_caught:
            return  # the deadline or the client ended it meanwhile (what it held is released)
        if st.done:
            release(state.rt, held)
            return
        st.starting = None
        _open(st, held, uside)
    finally:
        flush_all()


def _open(st: Stream, held: Held, uside: Side) -> None:
    """Open the stream on `uside` and send what the client said so far."""
    state = st.state
    ep = held.endpoint
    st.held = held
    st.ef = ef = state.figures.endpoint(st.service, ep.id)
    st.uside = uside
    st.usid = usid = uside.conn.next_stream_id
    uside.streams[usid] = st
    st.t0 = uside.last_used = _now
    ef.requests += 1
    ef.active += 1
    st.work = state.track(st.service, ep.id, _DrainDeadline())  # type: ignore[arg-type]
    q = st.up_q
    # A request without a body goes as one HEADERS frame with END_STREAM.
    ended = len(q) == 1 and q[0][0] == DATA and not q[0][1] and q[0][3]
    if ended:
        q.clear()
        st.up_ended = True
    try:
        uside.conn.send_headers(usid, st.headers, end_stream=ended)
    except H2UsageError as e:  # not there (too many streams, or a GOAWAY just came)
        log.info("http2 %s: cannot open a stream to %s: %s", st.service, ep.id, e)
        uside.goaway = True  # no further streams on this connection
        _refused(st)
        return
    uside.dirty()
    if q:
        _pump(st, up=True)


def _pump(st: Stream, up: bool) -> None:
    """Hand what waits in one direction to the other connection, within its windows."""
    if up:
        q, dst, dsid, src, ssid = st.up_q, st.uside, st.usid, st.cside, st.csid
    else:
        q, dst, dsid, src, ssid = st.down_q, st.cside, st.csid, st.uside, st.usid
    if dst is None or dst.dead:
        return
    conn = dst.conn
    ef = st.ef
    assert ef is not None
    try:
        while q:
            item = q[0]
            if item[0] == DATA:
                data = item[1]
                if data:
                    room = conn.send_window(dsid)
                    if room <= 0:
                        dst.blocked.append(st)
                        break
                    if room < len(data):
                        data, item[1] = data[:room], data[room:]
                        conn.send_data(dsid, data)
                        _count(st.lf, ef, up, len(data))
                        continue
                conn.send_data(dsid, data, end_stream=item[3])
                _count(st.lf, ef, up, len(data))
                q.popleft()
                if item[2]:
                    dst.ack_for(src, ssid, item[2])  # type: ignore[arg-type]
                if up:
                    st.up_ended = item[3]
                elif item[3]:
                    _complete(st)
                    break
            else:
                conn.send_headers(dsid, item[1], end_stream=True)
                q.popleft()
                if up:
                    st.up_ended = True
                else:
                    _complete(st)
                    break
    except H2UsageError:
        _unqueue(q, src, ssid)  # the other side ended the stream: its event says how
    dst.dirty()


def _count(lf: Figures, ef: Figures, up: bool, n: int) -> None:
    if up:
        lf.bytes_in += n
        ef.bytes_in += n
    else:
        lf.bytes_out += n
        ef.bytes_out += n


def _unqueue(q: deque[list[Any]], src: Side | None, sid: int) -> None:
    """Drop what waits in one direction, acknowledged to its sender: the stream ends, but
    the connection's window must not shrink by what it never forwarded."""
    if src is not None:
        for item in q:
            if item[0] == DATA and item[2]:
                src.ack(sid, item[2])
    q.clear()


def _complete(st: Stream) -> None:
    """The answer ended: the stream forgotten by both sides; its verdict to the core at
    the end of the step."""
    _forget(st)
    if not st.up_ended:  # answered before the request ended: the rest is not wanted
        st.uside.reset(st.usid, H2ErrorCode.NO_ERROR)  # type: ignore[union-attr]
    _verdicts.append(st)


def _verdict(st: Stream) -> None:
    assert st.held is not None and st.ef is not None
    finish(st.state.rt, st.held, ok=st.ok, latency=st.latency, now=_now)
    if not st.ok:
        st.lf.failures += 1
        st.ef.failures += 1


def _forget(st: Stream) -> None:
    if st.done:
        return
    st.done = True
    _unqueue(st.up_q, st.cside, st.csid)
    _unqueue(st.down_q, st.uside, st.usid)
    now = _now
    st.cside.streams.pop(st.csid, None)
    st.cside.last_used = now
    if st.starting is not None:
        st.starting.cancel()
    u = st.uside
    if u is not None:
        u.streams.pop(st.usid, None)
        u.last_used = now
        assert st.ef is not None and st.work is not None
        st.ef.active -= 1
        st.state.work.discard(st.work)


def _drop(st: Stream) -> None:
    """The stream ends with no verdict on its endpoint (the client left, or the endpoint
    left and its drain ran out)."""
    _forget(st)
    if st.uside is not None:
        st.uside.reset(st.usid)
    if st.held is not None:
        release(st.state.rt, st.held)


def _fail(st: Stream, status: int, grpc_status: bytes, text: str) -> None:
    """End a stream the proxy answers itself (the lease is already dealt with)."""
    if not st.done:
        _forget(st)
        _answer(st, status, grpc_status, text)


def _answer(st: Stream, status: int, grpc_status: bytes, text: str) -> None:
    """The proxy's own error answer to the client (a reset once the answer has begun)."""
    side, sid = st.cside, st.csid
    if side.dead:
        return
    if st.answered:
        side.reset(sid, H2ErrorCode.INTERNAL_ERROR)
        return
    try:
        if st.grpc:  # gRPC wants a trailers-only answer with its own status
            side.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                         (b"grpc-status", grpc_status), (b"grpc-message", text.encode()[:512])],
                                   end_stream=True)
        else:
            body = text.encode() + b"\n"
            side.conn.send_headers(sid, [(b":status", str(status).encode()), (b"content-type", b"text/plain"),
                                         (b"content-length", str(len(body)).encode())])
            side.conn.send_data(sid, body, end_stream=True)
    except H2UsageError:
        side.reset(sid, H2ErrorCode.INTERNAL_ERROR)
    side.dirty()


def _refused(st: Stream) -> None:
    """The upstream did not process the stream: send it again elsewhere if it can be."""
    held, ef = st.held, st.ef
    assert held is not None and ef is not None
    _forget(st)
    release(st.state.rt, held)  # says nothing against the endpoint
    if st.replay is None or st.attempt >= st.state.config.retries:
        _answer(st, 502, GRPC_UNAVAILABLE, f"{st.service}: endpoint {held.endpoint.id} refused the stream")
        return
    st.attempt += 1
    st.lf.retries += 1
    ef.retries += 1
    st.done = False
    st.held = st.ef = st.uside = st.work = None
    st.cside.streams[st.csid] = st
    st.up_q = deque([list(item) for item in st.replay])
    _begin(st, st.spawn)


def _upstream_failed(st: Stream) -> None:
    """Reset by the endpoint, or its connection broke: a failure; not resent (it may have
    been processed)."""
    held, ef = st.held, st.ef
    assert held is not None and ef is not None
    _forget(st)
    finish(st.state.rt, held, ok=False, latency=trio.current_time() - st.t0)
    st.lf.failures += 1
    ef.failures += 1
    _answer(st, 502, GRPC_UNAVAILABLE, f"{st.service}: endpoint {held.endpoint.id} reset the stream")


def _expired(st: Stream, now: float) -> None:
    """The stream's deadline passed, or its endpoint left and drain_timeout ran out."""
    if st.starting is not None:  # still picking or connecting: the task releases what it holds
        _forget(st)
    elif st.work is not None and st.work.scope.deadline <= now:
        _drop(st)
        _answer(st, 502, GRPC_UNAVAILABLE, f"{st.service}: endpoint {st.work.endpoint_id} left while answering")
        return
    else:
        _forget(st)
        if st.uside is not None:
            st.uside.reset(st.usid)
        if st.held is not None:
            finish(st.state.rt, st.held, ok=False, latency=now - st.t0)
            assert st.ef is not None
            st.ef.failures += 1
    st.state.figures.listener(st.state.service).failures += 1
    _answer(st, 504, GRPC_DEADLINE_EXCEEDED, f"no answer from {st.service} within {st.budget:g}s")


# ------------------------------------------------------------------------ events


def _data_stream(side: Side, ev: DataReceived) -> Stream | None:
    """The stream a DATA frame is for; data for a stream already ended is acknowledged and
    dropped."""
    st = side.streams.get(ev.stream_id)
    if st is None:
        side.ack(ev.stream_id, ev.flow_controlled_length)
    return st


def _queue(st: Stream, item: list[Any], up: bool) -> None:
    """Queue an item in one direction; send it now unless earlier ones still wait."""
    q = st.up_q if up else st.down_q
    q.append(item)
    if len(q) == 1 and (not up or st.uside is not None):
        _pump(st, up)


def _client_events(state: ListenerState, conn: Conn, side: Side, events: list[Any],
                   spawn: Callable[..., None]) -> None:
    streams = side.streams
    for ev in events:
        t = type(ev)
        if t is DataReceived:
            st = _data_stream(side, ev)
            if st is None:
                continue
            item = [DATA, ev.data, ev.flow_controlled_length, ev.end_stream]
            if st.replay is not None:
                st.replay_size += len(ev.data)
                if st.replay_size > REPLAY_MAX:
                    st.replay = None
                else:
                    st.replay.append([DATA, ev.data, 0, item[3]])  # acknowledged once, as sent
            _queue(st, item, up=True)
        elif t is RequestReceived:
            _request(state, conn, side, ev, spawn)
        elif t is TrailersReceived:
            st = streams.get(ev.stream_id)
            if st is not None:
                why = malformed_trailers(ev.headers)
                if why is not None:
                    log.info("http2 %s: malformed trailers from %s: %s", state.service, conn.peer_ip, why)
                    _drop(st)
                    side.reset(ev.stream_id, H2ErrorCode.PROTOCOL_ERROR)
                    continue
                item = [TRAILERS, ev.headers]
                if st.replay is not None:
                    st.replay.append(item)
                _queue(st, item, up=True)
        elif t is StreamReset:
            st = streams.get(ev.stream_id)
            if st is not None:  # the client gave up on the stream (or broke it): so do we, upstream
                _drop(st)
        elif t is WindowUpdated or t is RemoteSettingsChanged:
            if side.blocked:
                side.unblock()
        elif t is GoawayReceived:
            side.goaway = True


def _upstream_events(side: Side, events: list[Any]) -> None:
    streams = side.streams
    for ev in events:
        t = type(ev)
        if t is DataReceived:
            st = _data_stream(side, ev)
            if st is not None:
                _queue(st, [DATA, ev.data, ev.flow_controlled_length, ev.end_stream], up=False)
        elif t is ResponseReceived:
            st = streams.get(ev.stream_id)
            if st is not None:
                _answer_head(st, ev.headers, ev.end_stream)
        elif t is TrailersReceived:
            st = streams.get(ev.stream_id)
            if st is not None:
                for n, v in ev.headers:
                    if n == b"grpc-status" and v == GRPC_UNAVAILABLE:
                        st.ok = False
                _queue(st, [TRAILERS, ev.headers], up=False)
        elif t is StreamReset:
            # Streams above a GOAWAY's last stream id come as REFUSED_STREAM resets too.
            st = streams.get(ev.stream_id)
            if st is not None:
                if ev.error_code == H2ErrorCode.REFUSED_STREAM and not st.answered:
                    _refused(st)
                else:
                    _upstream_failed(st)
        elif t is WindowUpdated or t is RemoteSettingsChanged:
            if side.blocked:
                side.unblock()
        elif t is GoawayReceived:
            side.goaway = True
        # 1xx answers (InformationalResponseReceived) are not passed on.


def _answer_head(st: Stream, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
    if st.latency is None:
        st.latency = _now - st.t0
    hop = False
    for n, v in headers:
        if n == b":status":
            if v[:1] == b"5":
                st.ok = False
        elif n == b"grpc-status":
            if v == GRPC_UNAVAILABLE:
                st.ok = False
        elif n in HOP:
            hop = True
    if hop:
        headers = [(n, v) for n, v in headers if n not in HOP]
    try:
        st.cside.conn.send_headers(st.csid, headers, end_stream=ended)
    except H2UsageError:
        _drop(st)  # the client is gone
        return
    st.answered = True
    st.cside.dirty()
    if ended:
        _complete(st)


def _upstream_lost(side: Side) -> None:
    for st in list(side.streams.values()):
        _upstream_failed(st)


# ------------------------------------------------------------------------ upstreams


@dataclass(eq=False)
class Upstreams:
    """Pooled upstream HTTP/2 connections of one listener, by endpoint address."""

    conns: dict[tuple[str, int], list[Side]] = field(default_factory=dict)

    def find(self, key: tuple[str, int]) -> Side | None:
        for side in self.conns.get(key, ()):
            if side.dead or side.goaway:
                continue
            if len(side.conn.streams) < side.conn.peer_max_streams:
                return side
        return None

    def add(self, key: tuple[str, int], side: Side) -> None:
        self.conns.setdefault(key, []).append(side)

    def sweep(self, now: float, idle: float, serving: set[tuple[str, int]]) -> None:
        """Close connections with no streams that sat idle too long or lead to endpoints
        no longer served; forget dead ones."""
        for key, sides in list(self.conns.items()):
            keep = []
            for s in sides:
                if not s.dead and not s.streams and (s.goaway or key not in serving or now - s.last_used > idle):
                    s.close()
                if not s.dead:
                    keep.append(s)
            if keep:
                self.conns[key] = keep
            else:
                del self.conns[key]


def _upstreams(state: ListenerState) -> Upstreams:
    u = state.extra.get("h2")
    if u is None:
        u = state.extra["h2"] = Upstreams()
        state.sweepers.append(lambda now: _sweep(state, u, now))
    return u  # type: ignore[return-value]


def _sweep(state: ListenerState, u: Upstreams, now: float) -> None:
    _tick()
    serving = set()
    for name in {state.service, *(r.service for r in state.config.routes)}:
        b = state.rt.engine.services.get(name)
        if b is not None:
            serving.update((e.address, e.port) for e in b.served)
    u.sweep(now, state.config.idle_timeout, serving)
    flush_all()


class Failed(Exception):
    pass


async def _upstream(state: ListenerState, held: Held) -> Side:
    ep = held.endpoint
    key = (ep.address, ep.port)
    pool = _upstreams(state)
    side = pool.find(key)
    if side is not None:
        return side
    sock = await open_socket(ep.address, ep.port, state.config.connect_timeout)
    side = pool.find(key)  # another stream opened one meanwhile
    if side is not None:
        sock.close()
        return side
    side = Side(sock, client_side=True, errors=state.figures.http2_errors)
    side.on_lost = _upstream_lost
    side.start()
    pool.add(key, side)
    assert state.nursery is not None
    state.nursery.start_soon(side.read_loop, _upstream_events)
    state.nursery.start_soon(side.write_loop)
    state.figures.endpoint(held.service, ep.id).connections += 1
    return side


# ------------------------------------------------------------------------ client side


async def serve_http2(state: ListenerState, conn: Conn) -> None:
    side = Side(conn.sock, client_side=False, errors=state.figures.http2_errors)
    side.on_lost = _client_lost
    side.start()
    flush_all()
    async with trio.open_nursery() as tasks:
        spawn = tasks.start_soon
        tasks.start_soon(side.write_loop)
        tasks.start_soon(_housekeeping, state, side)
        # Draining is the housekeeping's: GOAWAY, open streams finish (conn.between, the
        # keep-alive grace of HTTP/1.1, does not apply).
        await side.read_loop(lambda s, events: _client_events(state, conn, s, events, spawn),
                             state.rt.turns, state.turn_key)
        tasks.cancel_scope.cancel()  # the client is gone: so is what worked for it


def _client_lost(side: Side) -> None:
    for st in list(side.streams.values()):
        _drop(st)


async def _housekeeping(state: ListenerState, side: Side) -> None:
    """Deadlines of the connection's streams (request_timeout, grpc-timeout, drain), its
    idle timeout, and GOAWAY at drain: one task per client connection, not a cancel scope
    per stream."""
    while not side.dead:
        now = _tick()
        streams = side.streams
        if not streams:
            idle = now - side.last_used > state.config.idle_timeout
            if idle or state.closing:
                side.close()
                flush_all()
                return
        elif state.closing and not side.goaway:
            side.goaway = True  # tell the client now; open streams finish
            side.conn.close(last_stream_id=max(streams))
            side.dirty()
        wake = now + (DRAIN_CHECK if streams else min(1.0, state.config.idle_timeout / 4))
        for st in list(streams.values()):
            due = st.deadline
            if st.work is not None and st.work.scope.deadline < due:
                due = st.work.scope.deadline
            if due <= now:
                _expired(st, now)
            elif due < wake:
                wake = due
        flush_all()
        side.timer = trio.CancelScope(deadline=wake)
        with side.timer:
            await trio.sleep_forever()
