"""http2 mode: h2c with prior knowledge, each stream picked on its own (gRPC's case).

A client's streams are spread over the service's endpoints, each carried on a pooled
upstream HTTP/2 connection to the picked endpoint (many streams share one). Headers,
data and trailers pass through as they come, under both connections' flow control: data
is acknowledged to its sender only once forwarded, so a slow side slows its peer instead
of filling memory. A stream ends ok unless the answer is a 5xx, a gRPC status
UNAVAILABLE, or a reset. `grpc-timeout` shortens request_timeout for its stream. GOAWAY
from an upstream moves new streams to another connection; streams it refused (above its
last stream id, or REFUSED_STREAM) are tried again elsewhere when their request was
small enough to keep.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from softlb import route

from .listener import Conn, ListenerState
from .picks import Held, NoEndpoint, finish, pick, release
from .upstream import LOCAL_ERRNOS, open_socket

log = logging.getLogger("softlb.proxy")

RECV = 64 * 1024
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


def grpc_timeout(value: bytes | None) -> float:
    """Seconds from a `grpc-timeout` header (`100m`, `5S`); inf when absent or malformed."""
    if not value or len(value) < 2 or value[-1:] not in GRPC_UNITS or not value[:-1].isdigit() or len(value) > 9:
        return math.inf
    return int(value[:-1]) * GRPC_UNITS[value[-1:]]


class Inbox:
    """What one side said on one stream, in order: ('headers', h), ('data', bytes, n),
    ('trailers', h), ('end',), ('reset', code), ('refused',)."""

    __slots__ = ("send", "recv")

    def __init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel[tuple[Any, ...]](math.inf)

    def put(self, item: tuple[Any, ...]) -> None:
        try:
            self.send.send_nowait(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass


class Side:
    """One HTTP/2 connection: h2's state machine, its socket, a write lock, per-stream inboxes."""

    def __init__(self, sock: trio.socket.SocketType, client_side: bool) -> None:
        cfg = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=cfg)
        self.sock = sock
        self.lock = trio.Lock()
        self.streams: dict[int, Inbox] = {}
        self._window = trio.Event()
        self.dead = False
        self.goaway = False
        self.last_used = trio.current_time()

    def start(self) -> None:
        self.conn.local_settings = h2.settings.Settings(client=self.conn.config.client_side, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
        })
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONN_WINDOW - 65535)

    async def flush(self) -> None:
        async with self.lock:
            data = self.conn.data_to_send()
            if data and not self.dead:
                try:
                    await _send(self.sock, data)
                except OSError:
                    self.lost()

    def wake(self) -> None:
        self._window.set()
        self._window = trio.Event()

    async def send_data(self, sid: int, data: bytes, end: bool, flush: bool = True) -> None:
        """Send within the peer's flow-control windows, waiting for them to open. With
        `flush` false the frames stay queued (the caller flushes once it has nothing more),
        unless a window must be waited for."""
        view = memoryview(data)
        while view:
            if self.dead:
                raise ConnectionError("connection lost")
            try:
                room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            except (h2.exceptions.StreamClosedError, KeyError):
                raise ConnectionError("stream closed") from None
            if room <= 0:
                opened = self._window  # taken before the flush: an update during it must count
                await self.flush()
                await opened.wait()
                continue
            chunk = view[:room]
            self.conn.send_data(sid, bytes(chunk), end_stream=end and len(chunk) == len(view))
            view = view[len(chunk):]
        if not data and end:
            self.conn.end_stream(sid)
        if flush:
            await self.flush()

    def ack(self, sid: int, n: int) -> None:
        try:
            self.conn.acknowledge_received_data(n, sid)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            pass

    def reset(self, sid: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        try:
            self.conn.reset_stream(sid, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            pass

    def lost(self) -> None:
        if not self.dead:
            self.dead = True
            for box in self.streams.values():
                box.put(("reset", None))
            self.wake()
            self.sock.close()

    def dispatch(self, ev: object) -> int | None:
        """Route one h2 event to its stream's inbox; returns a new request's stream id."""
        if isinstance(ev, h2.events.DataReceived):
            box = self.streams.get(ev.stream_id)
            if box is None:
                self.ack(ev.stream_id, ev.flow_controlled_length)
            else:
                box.put(("data", ev.data, ev.flow_controlled_length))
            if ev.stream_ended:
                self._put(ev.stream_id, ("end",))
        elif isinstance(ev, (h2.events.ResponseReceived, h2.events.RequestReceived)):
            # Headers that end the stream (gRPC's trailers-only answer) stay one item, so
            # they are passed on as one HEADERS frame with END_STREAM.
            self._put(ev.stream_id, ("headers", ev.headers, ev.stream_ended is not None))
            if isinstance(ev, h2.events.RequestReceived):
                return ev.stream_id
        elif isinstance(ev, h2.events.TrailersReceived):
            self._put(ev.stream_id, ("trailers", ev.headers))
            self._put(ev.stream_id, ("end",))
        elif isinstance(ev, h2.events.StreamEnded):
            pass  # reported with the frame that carried END_STREAM
        elif isinstance(ev, h2.events.StreamReset):
            code = ev.error_code
            self._put(ev.stream_id, ("refused",) if code == h2.errors.ErrorCodes.REFUSED_STREAM else ("reset", code))
        elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.wake()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = True
            last = ev.last_stream_id or 0
            for sid, box in self.streams.items():
                if sid > last:
                    box.put(("refused",))
        return None

    def _put(self, sid: int, item: tuple[Any, ...]) -> None:
        box = self.streams.get(sid)
        if box is not None:
            box.put(item)

    async def read_loop(self, on_request: Any = None) -> None:
        """Feed h2 from the socket until it closes; `on_request(stream_id)` for new
        requests (client-facing side)."""
        try:
            while not self.dead:
                data = await self.sock.recv(RECV)
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    log.info("http2: protocol error from peer: %s", e)
                    await self.flush()  # h2 queued a GOAWAY saying why
                    break
                for ev in events:
                    if isinstance(ev, h2.events.RequestReceived):
                        self.streams[ev.stream_id] = Inbox()
                    sid = self.dispatch(ev)
                    if sid is not None and on_request is not None:
                        on_request(sid)
                await self.flush()
        except OSError:
            pass
        finally:
            self.lost()


async def _send(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


# ------------------------------------------------------------------------ upstreams


@dataclass(eq=False)
class Upstreams:
    """Pooled upstream HTTP/2 connections of one listener, by endpoint address."""

    conns: dict[tuple[str, int], list[Side]] = field(default_factory=dict)

    def find(self, key: tuple[str, int]) -> Side | None:
        for side in self.conns.get(key, ()):
            if side.dead or side.goaway:
                continue
            limit = side.conn.remote_settings.max_concurrent_streams
            if side.conn.open_outbound_streams < limit:
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
                    s.conn.close_connection()
                    s.dead = True
                    s.sock.close()
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
    serving = set()
    for name in {state.service, *(r.service for r in state.config.routes)}:
        b = state.rt.engine.services.get(name)
        if b is not None:
            serving.update((e.address, e.port) for e in b.served)
    u.sweep(now, state.config.idle_timeout, serving)


class Refused(Exception):
    """The upstream did not process the stream (GOAWAY, REFUSED_STREAM): safe to resend."""


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
    side = Side(sock, client_side=True)
    side.start()
    await side.flush()
    pool.add(key, side)
    assert state.nursery is not None
    state.nursery.start_soon(side.read_loop)
    state.figures.endpoint(held.service, ep.id).connections += 1
    return side


# ------------------------------------------------------------------------ client side


async def serve_http2(state: ListenerState, conn: Conn) -> None:
    side = Side(conn.sock, client_side=False)
    side.start()
    await side.flush()
    lf = state.figures.listener(state.service)
    async with trio.open_nursery() as streams:

        def on_request(sid: int) -> None:
            if state.closing:
                side.streams.pop(sid, None)
                side.reset(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            lf.requests += 1
            streams.start_soon(_stream, state, conn, side, sid)

        with trio.CancelScope() as idle:
            conn.between = idle
            streams.start_soon(_idle_watch, state, side, idle)
            await side.read_loop(on_request)
        streams.cancel_scope.cancel()  # the client is gone: its streams with it


async def _idle_watch(state: ListenerState, side: Side, reader: trio.CancelScope) -> None:
    """GOAWAY a client connection with no open stream for idle_timeout, or at drain."""
    while not side.dead:
        await trio.sleep(min(1.0, state.config.idle_timeout / 4))
        idle = not side.streams and trio.current_time() - side.last_used > state.config.idle_timeout
        if idle or (state.closing and not side.streams):
            side.conn.close_connection()
            await side.flush()
            reader.cancel()
            side.lost()
            return
        if state.closing and not side.goaway:
            side.goaway = True  # tell the client now; open streams finish
            side.conn.close_connection(last_stream_id=max(side.streams, default=0))
            await side.flush()


def _forwarded(headers: list[tuple[bytes, bytes]], peer: str | None) -> list[tuple[bytes, bytes]]:
    out = []
    xff = None
    for n, v in headers:
        if n in HOP or (n == b"te" and v != b"trailers"):
            continue
        if n == b"x-forwarded-for" and peer is not None:
            xff = v
            continue
        out.append((n, v))
    if peer is not None:
        out.append((b"x-forwarded-for", xff + b", " + peer.encode() if xff else peer.encode()))
    return out


async def _stream(state: ListenerState, conn: Conn, cside: Side, sid: int) -> None:
    inbox = cside.streams[sid]
    cfg = state.config
    try:
        first = inbox.recv.receive_nowait()
    except trio.WouldBlock:  # pragma: no cover - the headers are queued before the stream starts
        first = ("reset", None)
    if first[0] != "headers":
        cside.streams.pop(sid, None)
        return
    headers = first[1]
    if first[2]:
        inbox.put(("end",))
    h = dict(headers)
    authority = (h.get(b":authority") or h.get(b"host") or b"").decode("latin-1")
    path = (h.get(b":path") or b"/").decode("latin-1")
    service = route(cfg.routes, state.service, authority, path) if cfg.routes else state.service
    grpc = (h.get(b"content-type") or b"").startswith(b"application/grpc")
    budget = min(cfg.request_timeout, grpc_timeout(h.get(b"grpc-timeout")))
    answered = [False]
    try:
        with trio.move_on_after(budget) as timer:
            await _proxy_stream(state, conn, cside, sid, inbox, service, _forwarded(headers, conn.peer_ip), answered)
        if timer.cancelled_caught:
            state.figures.listener(state.service).failures += 1
            await _fail(cside, sid, answered[0], grpc, 504, b"4", f"no answer from {service} within {budget:g}s")
    except NoEndpoint as e:
        await _fail(cside, sid, answered[0], grpc, 503, GRPC_UNAVAILABLE, f"no endpoint for {service}: {e.message}")
    except Failed as e:
        await _fail(cside, sid, answered[0], grpc, 502, GRPC_UNAVAILABLE, str(e))
    finally:
        cside.streams.pop(sid, None)
        cside.last_used = trio.current_time()


async def _fail(side: Side, sid: int, answered: bool, grpc: bool, status: int, grpc_status: bytes, text: str) -> None:
    if side.dead:
        return
    if answered:
        side.reset(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
    else:
        try:
            if grpc:  # gRPC wants a trailers-only answer with its own status
                side.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                             (b"grpc-status", grpc_status), (b"grpc-message", text.encode()[:512])],
                                       end_stream=True)
            else:
                body = text.encode() + b"\n"
                side.conn.send_headers(sid, [(b":status", str(status).encode()), (b"content-type", b"text/plain"),
                                             (b"content-length", str(len(body)).encode())])
                side.conn.send_data(sid, body, end_stream=True)
        except (h2.exceptions.ProtocolError, h2.exceptions.FlowControlError, KeyError):
            side.reset(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
    await side.flush()


async def _proxy_stream(state: ListenerState, conn: Conn, cside: Side, sid: int, inbox: Inbox, service: str,
                        headers: list[tuple[bytes, bytes]], answered: list[bool]) -> None:
    cfg = state.config
    figures = state.figures
    lf = figures.listener(service)
    replay: list[tuple[Any, ...]] = []  # the request so far, while small enough to resend
    replay_size = 0
    replayable = True
    request_done = False
    attempt = 0
    tried: list[str] = []
    while True:
        held = await pick(state.rt, service, source=conn.peer_ip,
                          key=f"{conn.peer_ip}#retry{attempt}" if attempt else None)
        ep = held.endpoint
        ef = figures.endpoint(service, ep.id)
        t0 = trio.current_time()
        try:
            uside = await _upstream(state, held)
        except (OSError, trio.TooSlowError) as e:
            if isinstance(e, OSError) and e.errno in LOCAL_ERRNOS:
                release(state.rt, held)
                raise Failed(f"{service}: cannot open a socket: {e.strerror}") from None
            finish(state.rt, held, ok=False, latency=trio.current_time() - t0)
            lf.failures += 1
            ef.failures += 1
            tried.append(ep.id)
            if attempt >= cfg.retries:
                raise Failed(f"{service}: no endpoint accepted a connection (tried {', '.join(tried)})") from None
            attempt += 1
            lf.retries += 1
            continue
        usid = uside.conn.get_next_available_stream_id()
        ubox = uside.streams[usid] = Inbox()
        uside.last_used = t0
        ef.requests += 1
        ef.active += 1
        work = state.track(service, ep.id, trio.CancelScope())
        outcome: dict[str, Any] = {"ok": True, "latency": None, "refused": False}
        try:
            with work.scope:
                uside.conn.send_headers(usid, headers, end_stream=request_done and not replay)
                if request_done and not replay:
                    await uside.flush()
                async with trio.open_nursery() as n:

                    async def upload() -> None:
                        nonlocal replay_size, replayable, request_done
                        for item in list(replay):  # a resend: what the client already sent
                            await _up_item(uside, usid, item)
                        if request_done:
                            return
                        if inbox.recv.statistics().current_buffer_used == 0:
                            await uside.flush()  # the headers go now: the body may take a while
                        async for item in inbox.recv:
                            more = inbox.recv.statistics().current_buffer_used > 0
                            if item[0] == "data":
                                if replayable:
                                    replay_size += len(item[1])
                                    if replay_size > REPLAY_MAX:
                                        replayable = False
                                        replay.clear()
                                    else:
                                        replay.append(item)
                                await _up_item(uside, usid, item, flush=not more)
                                cside.ack(sid, item[2])
                                if not more:
                                    await cside.flush()
                                lf.bytes_in += len(item[1])
                                ef.bytes_in += len(item[1])
                            elif item[0] in ("trailers", "end"):
                                if replayable:
                                    replay.append(item)
                                await _up_item(uside, usid, item)
                                if item[0] == "end":
                                    request_done = True
                                    return
                            elif item[0] in ("reset", "refused"):
                                # The client gave up on the stream: so do we, upstream.
                                uside.reset(usid)
                                await uside.flush()
                                n.cancel_scope.cancel()
                                outcome["client_gone"] = True
                                return
                        await cside.flush()

                    async def download() -> None:
                        async for item in ubox.recv:
                            kind = item[0]
                            more = ubox.recv.statistics().current_buffer_used > 0
                            if kind == "headers":
                                hs = [(k, v) for k, v in item[1] if k not in HOP]
                                status = dict(hs).get(b":status", b"200")
                                if status.startswith(b"1"):
                                    continue
                                if outcome["latency"] is None:
                                    outcome["latency"] = trio.current_time() - t0
                                if status.startswith(b"5") or dict(hs).get(b"grpc-status") == GRPC_UNAVAILABLE:
                                    outcome["ok"] = False
                                cside.conn.send_headers(sid, hs, end_stream=item[2])
                                answered[0] = True
                                if item[2] or not more:
                                    await cside.flush()
                                if item[2]:
                                    n.cancel_scope.cancel()
                                    return
                            elif kind == "data":
                                await cside.send_data(sid, item[1], False, flush=not more)
                                uside.ack(usid, item[2])
                                if not more:
                                    await uside.flush()
                                lf.bytes_out += len(item[1])
                                ef.bytes_out += len(item[1])
                            elif kind == "trailers":
                                if dict(item[1]).get(b"grpc-status") == GRPC_UNAVAILABLE:
                                    outcome["ok"] = False
                                cside.conn.send_headers(sid, item[1], end_stream=True)
                                await cside.flush()
                                n.cancel_scope.cancel()
                                return
                            elif kind == "end":
                                await cside.send_data(sid, b"", True)
                                n.cancel_scope.cancel()
                                return
                            elif kind == "refused" and not answered[0]:
                                outcome["refused"] = True
                                n.cancel_scope.cancel()
                                return
                            else:  # reset, or the connection was lost
                                outcome["ok"] = False
                                outcome["reset"] = item[1]
                                n.cancel_scope.cancel()
                                return

                    n.start_soon(upload)
                    n.start_soon(download)
        except ConnectionError:
            outcome["ok"] = False
            outcome["reset"] = None
        finally:
            ef.active -= 1
            state.work.discard(work)
            uside.streams.pop(usid, None)
            uside.last_used = trio.current_time()
        if work.scope.cancelled_caught:  # the endpoint left and drain_timeout ran out
            uside.reset(usid)
            await uside.flush()
            release(state.rt, held)
            raise Failed(f"{service}: endpoint {ep.id} left while answering")
        if outcome.get("client_gone"):
            release(state.rt, held)
            return
        if outcome["refused"]:
            release(state.rt, held)  # not processed: says nothing against the endpoint
            if not replayable or attempt >= cfg.retries:
                raise Failed(f"{service}: endpoint {ep.id} refused the stream")
            attempt += 1
            lf.retries += 1
            ef.retries += 1
            continue
        if "reset" in outcome:
            finish(state.rt, held, ok=False, latency=trio.current_time() - t0)
            lf.failures += 1
            ef.failures += 1
            if not answered[0]:
                raise Failed(f"{service}: endpoint {ep.id} reset the stream")
            cside.reset(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            await cside.flush()
            return
        finish(state.rt, held, ok=outcome["ok"], latency=outcome["latency"])
        if not outcome["ok"]:
            lf.failures += 1
            ef.failures += 1
        return


async def _up_item(uside: Side, usid: int, item: tuple[Any, ...], flush: bool = True) -> None:
    kind = item[0]
    if kind == "data":
        await uside.send_data(usid, item[1], False, flush=flush)
    elif kind == "trailers":
        uside.conn.send_headers(usid, item[1], end_stream=True)
        await uside.flush()
    elif kind == "end":
        try:
            uside.conn.end_stream(usid)
        except h2.exceptions.ProtocolError:
            pass  # already ended by trailers
        await uside.flush()
