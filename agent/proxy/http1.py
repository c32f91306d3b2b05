"""http mode: HTTP/1.1, a pick per request over pooled keep-alive upstreams.

One client connection carries many requests; each is routed (Host, path prefix), picked
on its own (held lease for the request's life), sent over a pooled upstream connection
or a new one, and its answer streamed back as it arrives: bodies are never buffered
whole, in either direction. A connect failure moves on to another endpoint; so does a
reset before any answer, for idempotent requests without a body. Upgrades (WebSocket)
become a tcp tunnel after the pick.

Parsing is httptools (llhttp, C): with h11 parsing and re-serialising took ~600 µs per
proxied request on the benchmark machine, most of the proxy's time (docs/BENCHMARKS.md);
framing out is written here, since it is a few lines per case.
"""

from __future__ import annotations

import collections
import logging
import math
import socket
from dataclasses import dataclass
from functools import partial
from typing import Any, Awaitable, Callable

import httptools
import trio

from softlb import route

from .heads import Head, simple_request, simple_response
from .listener import KEEPALIVE_GRACE, Conn, ListenerState, Work
from .picks import NoEndpoint, finish, pick, pick_now, release
from .pool import Pool
from .relay import Idle, Tunnel
from .upstream import LOCAL_ERRNOS, Try, UpstreamFailed, connect_picked, open_raw

log = logging.getLogger("softlb.proxy")

RECV = 64 * 1024
#: Reads for a message head (the client's next request, an upstream's answer): most are a
#: few hundred bytes, and a read's buffer is allocated whole before the call (64 KiB cost
#: ~0.8 µs more a call here, EAGAIN included); a bigger body comes in RECV reads after it.
HEAD_RECV = 16 * 1024
#: Hop-by-hop headers (RFC 9110 7.6.1): they describe one connection, never forwarded.
#: Framing (transfer-encoding, and content-length when re-chunked) is re-made per side.
HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
                 b"transfer-encoding"})
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
#: A pooled connection idle longer than this is peeked at (one syscall) before reuse, in
#: case its server closed it meanwhile; one used more recently is taken as it is (a
#: server closing it that soon without saying so meets the stale retry below).
PEEK_AFTER = 1.0
#: Reused pooled connections found closed by the server, retried at most this often per
#: request before counting as a failure (each one found is dropped from the pool).
STALE_RETRIES = 8
REASONS = {200: b"OK", 400: b"Bad Request", 502: b"Bad Gateway", 503: b"Service Unavailable",
           504: b"Gateway Timeout"}


class Parser:
    """llhttp through httptools, as a queue of events: ('head', Head), ('data', bytes),
    ('end',). Raises httptools.HttpParserError on garbage; an upgrade request leaves
    `upgrade_data` (bytes after its head) and `upgraded` set."""

    def __init__(self, response: bool) -> None:
        self.events: collections.deque[tuple[Any, ...]] = collections.deque()
        self.response = response
        self.p = httptools.HttpResponseParser(self) if response else httptools.HttpRequestParser(self)
        self.head = Head()
        self.upgraded = False
        self.upgrade_data = b""
        self.in_message = False

    def feed(self, data: bytes) -> None:
        if not self.in_message:  # llhttp holds nothing: plain messages can skip it
            data = self._simple(data)
            if not data:
                return
        try:
            self.p.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.upgraded = True
            self.upgrade_data = data[e.args[0]:]

    def _simple(self, data: bytes) -> bytes:
        """Take the plain messages at the front of `data` (heads.py); the rest is llhttp's."""
        events = self.events
        if self.response:
            answer = simple_response(data)
            if answer is None:
                return data
            self.head, body = answer
            events.append(("head", self.head))
            if body:
                events.append(("data", body))
            events.append(("end",))
            return b""
        while data:
            request = simple_request(data)
            if request is None:
                return data
            self.head, used = request
            events.append(("head", self.head))
            events.append(("end",))
            data = data[used:]
        return data

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.head = Head()
        self.in_message = True

    def on_url(self, url: bytes) -> None:
        self.head.target += url

    def on_status(self, reason: bytes) -> None:
        self.head.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        h = self.head
        h.headers.append((name, value))
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            h.chunked = True
        elif name == b"content-length" and value.strip().isdigit():
            h.length = int(value)
        elif name == b"upgrade":
            h.upgrade = True

    def on_headers_complete(self) -> None:
        h, p = self.head, self.p
        h.keep_alive = p.should_keep_alive()
        h.version = p.get_http_version()
        if self.response:
            h.status = p.get_status_code()
        else:
            h.method = p.get_method()
        self.events.append(("head", h))

    def on_body(self, body: bytes) -> None:
        self.events.append(("data", body))

    def on_message_complete(self) -> None:
        self.in_message = False
        self.events.append(("end",))


class UpstreamError(Exception):
    """The upstream failed before answering (reset, EOF, garbage): maybe retriable."""


class _ClientGone(Exception):
    pass


@dataclass(eq=False, slots=True)
class Upstream:
    sock: socket.socket
    parser: Parser
    key: tuple[str, int]
    reused: bool = False

    def close(self) -> None:
        self.sock.close()


def _pool(state: ListenerState) -> Pool[Upstream]:
    p = state.extra.get("pool")
    if p is None:
        p = state.extra["pool"] = Pool(Upstream.close)
    return p  # type: ignore[return-value]


class _Phase:
    """Where a client connection is, for its one cancel scope: between requests (bounded
    by the idle timeout, or the keep-alive grace at a drain) or in one (the request
    timeout). The hot path only counts phase changes (`n`); the listener's sweep, every
    DRAIN_CHECK, cancels the scope once one phase has lasted its timeout (so up to two
    sweeps late). A deadline moved on a trio scope twice per request, and the clock reads
    for it, cost more than the rest of the request's bookkeeping."""

    __slots__ = ("scope", "in_request", "n", "seen", "since", "idle", "request", "grace", "answer", "work",
                 "service", "xff")

    def __init__(self, idle: float, request: float, peer_ip: str) -> None:
        self.scope = trio.CancelScope()
        self.in_request = False
        self.n = 0
        self.seen = -1
        self.since = 0.0
        self.idle = idle  # the current wait's bound between requests
        self.request = request
        self.grace = math.inf
        self.answer = [False]  # the client has seen a response head
        self.work: Work | None = None
        self.service = ""
        #: The end of a plain head passed on: the client's address added, once per connection.
        self.xff = b"x-forwarded-for: " + peer_ip.encode() + b"\r\n\r\n"

    def keepalive_grace(self, deadline: float) -> None:
        """The listener drains: a keep-alive wait ends at `deadline`; a request in progress
        keeps its own timeout and meets this one after it."""
        self.grace = min(self.grace, deadline)

    def sweep(self, now: float) -> None:
        if self.n != self.seen:
            self.seen = self.n
            self.since = now
        if self.in_request:
            if now - self.since >= self.request:
                self.scope.cancel()
        elif now >= self.grace or now - self.since >= self.idle:
            self.scope.cancel()


# Sockets are driven directly: a try first, a trio wait only when the kernel says
# EAGAIN. (A trio socket ends every successful call with a scheduler pass: four per
# proxied request, most of what a keep-alive request cost.) Long transfers yield every
# RECV bytes or so, and serve_http1 every few requests, so one connection cannot hold the
# loop.
_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable


def _send_now(sock: socket.socket, data: bytes | bytearray) -> memoryview | None:
    """One try at sending, with no coroutine (most sends take it all): what is left, or
    None. Raises OSError but for EAGAIN."""
    try:
        n = sock.send(data)
    except BlockingIOError:
        n = 0
    return None if n == len(data) else memoryview(data)[n:]


async def _send(sock: socket.socket, data: bytes | bytearray | memoryview) -> None:
    try:
        n = sock.send(data)
    except BlockingIOError:
        n = 0
    if n == len(data):
        return
    view = memoryview(data)[n:]
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            await _wait_writable(sock)
            continue
        view = view[n:]


async def _recv(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(RECV)
        except BlockingIOError:
            await _wait_readable(sock)


async def _event(sock: socket.socket, parser: Parser) -> tuple[Any, ...] | None:
    """The next event; None at end of stream."""
    events = parser.events
    while not events:
        if parser.upgraded:
            return None
        try:
            data = sock.recv(HEAD_RECV)
        except BlockingIOError:
            await _wait_readable(sock)
            continue
        if not data:
            return None
        parser.feed(data)
    return events.popleft()


def _headers_for(headers: list[tuple[bytes, bytes]], xff: str | None) -> list[tuple[bytes, bytes]]:
    drop = HOP
    for name, value in headers:
        if name == b"connection":  # headers the Connection header names are hop-by-hop too
            drop = drop | {v.strip().lower() for v in value.split(b",")}
    out = []
    prior_xff = None
    for name, value in headers:
        if name in drop:
            continue
        if name == b"x-forwarded-for" and xff is not None:
            prior_xff = value if prior_xff is None else prior_xff + b", " + value
            continue
        out.append((name, value))
    if xff is not None:
        me = xff.encode()
        out.append((b"x-forwarded-for", prior_xff + b", " + me if prior_xff else me))
    return out


def _head_bytes(first: bytes, headers: list[tuple[bytes, bytes]], extra: bytes = b"") -> bytearray:
    out = bytearray(first)
    for n, v in headers:
        out += n + b": " + v + b"\r\n"
    out += extra + b"\r\n"
    return out


def _is_upgrade(h: Head) -> bool:
    if not h.upgrade:
        return False
    conn = b",".join(v for n, v in h.headers if n == b"connection").lower()
    return b"upgrade" in conn and h.get(b"upgrade") is not None


async def _error(sock: socket.socket, status: int, text: str) -> None:
    body = text.encode() + b"\n"
    data = (b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, REASONS.get(status, b"Error"), len(body))) + body
    try:
        await _send(sock, data)
    except OSError:
        pass


#: A proxied request's units in the agent's pass budget (agent/turns.py, a unit ~30-60 us
#: of work): two steps, the request's and the answer's, ~85 us of CPU here. At 1 a wrk -c256
#: flood through the listener held a resolve caller's p99 at 4-7 ms (bench/bystander.py
#: proxy_http, pooled over three runs); at 2, RELIABILITY has the figures.
REQUEST_COST = 2


async def serve_http1(state: ListenerState, conn: Conn) -> None:
    sock = conn.raw
    parser = Parser(response=False)
    lf = state.figures.listener(state.service)
    # One cancel scope for the connection's life, cancelled by the listener's sweep (a
    # scope per request and per wait was a fifth of a keep-alive request's cost).
    cfg = state.config
    ph = _Phase(cfg.idle_timeout, cfg.request_timeout, conn.peer_ip)
    conn.keepalive_grace = ph.keepalive_grace
    state.idles.add(ph)
    served = 0
    turns = state.rt.turns
    key = state.turn_key
    try:
        with ph.scope:
            while True:
                ph.n += 1
                if state.closing:
                    ph.idle = KEEPALIVE_GRACE
                try:
                    ev = await _event(sock, parser)
                except httptools.HttpParserError as e:
                    await _error(sock, 400, f"bad request: {e}")
                    return
                except OSError:
                    return
                if ev is None or ev[0] != "head":
                    return  # idle, draining, closed, or the connection's end
                lf.requests += 1
                ph.in_request = True
                ph.n += 1
                ph.answer[0] = False
                ph.work = None
                if turns is not None and not turns.free(key, REQUEST_COST):
                    await turns.wait(key, REQUEST_COST)  # a flood of proxied requests shares the pass
                keep = await _request(state, conn, parser, ev[1], ph)
                ph.in_request = False
                if ph.work is not None and ph.work.leaving_since is not None:
                    ph.scope.deadline = math.inf  # that endpoint's drain is not the next request's
                if not keep:
                    return
                served += 1
                if served % 8 == 0:
                    await trio.lowlevel.checkpoint()  # a pipelining client takes turns too
    finally:
        state.idles.discard(ph)
    if not ph.in_request:
        return  # idle or drained between requests
    w = ph.work
    if w is not None and w.leaving_since is not None and trio.current_time() >= w.leaving_since + cfg.drain_timeout:
        if not ph.answer[0]:  # the endpoint left and drain_timeout ran out
            await _error(sock, 502, f"{w.service}: endpoint {w.endpoint_id} left while answering")
        return
    lf.failures += 1
    if not ph.answer[0]:
        await _error(sock, 504, f"no complete answer from {ph.service} within {ph.request:g}s")


async def _request(state: ListenerState, conn: Conn, parser: Parser, req: Head, ph: _Phase) -> bool:
    """Forward one request; True if the client connection may carry another. A request
    timeout cancels ph.scope; serve_http1 answers it."""
    cfg = state.config
    service = route(cfg.routes, state.service, (req.get(b"host") or b"").decode("latin-1"),
                    req.target.decode("latin-1")) if cfg.routes else state.service
    ph.service = service
    if req.upgrade and _is_upgrade(req):
        ph.request = math.inf  # a tunnel now: its own idle timer bounds it
        await _upgrade(state, conn, parser, req, service)
        return False
    answer = ph.answer
    try:
        keep = await _exchange(state, conn, parser, req, service, ph)
    except NoEndpoint as e:
        await _error(conn.raw, 503, f"no endpoint for {service}: {e.message}")
        return False
    except UpstreamFailed as e:
        await _error(conn.raw, 502, str(e))
        return False
    except httptools.HttpParserError as e:
        if not answer[0]:
            await _error(conn.raw, 400, f"bad request: {e}")
        return False
    except _ClientGone:
        return False
    # Closing only when the answer said so: a connection the client still thinks open
    # would take its next request and drop it.
    return keep


def _closed(sock: socket.socket) -> bool:
    """Whether an idle pooled connection was closed by its server (EOF or reset waiting):
    one non-blocking peek, cheaper than a failed request."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def _exchange(state: ListenerState, conn: Conn, parser: Parser, req: Head, service: str, ph: _Phase) -> bool:
    cfg = state.config
    figures = state.figures
    lf = figures.listener(service)
    pool = _pool(state)
    answer = ph.answer
    has_body = req.chunked or bool(req.length)
    if req.raw is not None:  # a plain head (heads.py): its lines pass on as they came
        head = bytearray(req.lines + ph.xff)
    else:
        framing = b"transfer-encoding: chunked\r\n" if req.chunked else b""
        head = _head_bytes(req.method + b" " + req.target + b" HTTP/1.1\r\n", _headers_for(req.headers, conn.peer_ip),
                           framing)
    # (a plain head has no Expect: heads.py leaves those to llhttp)
    expect = req.raw is None and (req.get(b"expect") or b"").lower() == b"100-continue"
    replayable = req.method in IDEMPOTENT and not has_body
    body_read = not has_body  # the whole request body has been taken from the client
    if body_read and parser.events and parser.events[0][0] == "end":
        parser.events.popleft()
    attempt = 0
    stale = 0
    tried: list[str] = []
    while True:
        pick_key = f"{conn.peer_ip}#retry{attempt}" if attempt else None
        held = pick_now(state.rt, service, source=conn.peer_ip, key=pick_key)
        if held is None:  # a catalog source is still fetching the service
            held = await pick(state.rt, service, source=conn.peer_ip, key=pick_key)
        ep = held.endpoint
        ef = figures.endpoint(service, ep.id)
        key = (ep.address, ep.port)
        up = None
        t0 = held.started  # one clock read for the pick, the pool and the latency
        while (got := pool.take(key, cfg.idle_timeout, t0)) is not None:
            up = got[0]
            if got[1] < PEEK_AFTER or not _closed(up.sock):
                up.reused = True
                break
            up.close()  # the server closed it while it sat idle
            up = None
        if up is None:
            try:
                sock = await open_raw(ep.address, ep.port, cfg.connect_timeout)
            except (OSError, trio.TooSlowError) as e:
                if isinstance(e, OSError) and e.errno in LOCAL_ERRNOS:
                    release(state.rt, held)
                    raise UpstreamFailed(f"{service}: cannot open a socket: {e.strerror}") from None
                finish(state.rt, held, ok=False, latency=trio.current_time() - t0)
                lf.failures += 1
                ef.failures += 1
                tried.append(ep.id)
                log.info("%s: connect to %s failed: %s", service, ep.id,
                         "timed out" if isinstance(e, trio.TooSlowError) else e.strerror)
                if attempt >= cfg.retries:
                    raise UpstreamFailed(f"{service}: no endpoint accepted a connection (tried {', '.join(tried)})")
                attempt += 1
                lf.retries += 1
                continue
            ef.connections += 1
            up = Upstream(sock, Parser(response=True), key)
            t0 = trio.current_time()  # latency counts from the request sent, not the connect
        ef.requests += 1
        ef.active += 1
        # The endpoint leaving cuts the request after drain_timeout: through the connection's
        # scope (serve_http1 tells that from a timeout by the work's leaving_since).
        work = ph.work = state.track(service, ep.id, ph.scope)
        try:
            status, latency, reusable, close_client, now = await _forward(state, conn, parser, req, head, up,
                                                                          expect, body_read, answer, lf, ef, t0)
        except UpstreamError as e:
            up.close()
            log.debug("%s: %s failed: %s (attempt %d)", service, ep.id, e, attempt)
            body_read = body_read or not has_body
            if up.reused and stale < STALE_RETRIES and not answer[0] and body_read and not has_body:
                # A pooled connection the server had closed: not the endpoint's fault.
                release(state.rt, held)
                stale += 1
                continue
            finish(state.rt, held, ok=False, latency=trio.current_time() - t0)
            lf.failures += 1
            ef.failures += 1
            tried.append(ep.id)
            if answer[0]:
                raise _ClientGone() from None  # mid-answer: all we can do is cut the client off
            if not replayable or attempt >= cfg.retries:
                raise UpstreamFailed(f"{service}: endpoint {ep.id} failed before answering: {e}") from None
            attempt += 1
            lf.retries += 1
            ef.retries += 1
            continue
        except BaseException:
            up.close()
            release(state.rt, held)
            raise
        finally:
            ef.active -= 1
            state.work.discard(work)
        finish(state.rt, held, ok=status < 500, latency=latency, now=now)
        if status >= 500:
            lf.failures += 1
            ef.failures += 1
        if reusable and not state.closing:
            up.reused = False
            pool.put(key, up, now)
        else:
            up.close()
        return not close_client


async def _forward(state: ListenerState, conn: Conn, parser: Parser, req: Head, head: bytearray, up: Upstream,
                   expect: bool, body_read: bool, answer: list[bool], lf: Any, ef: Any,
                   t0: float) -> tuple[int, float, bool, bool, float]:
    """Send the request, stream the answer back: (status, seconds to the answer's head,
    whether the upstream connection can carry another request, whether the client's must
    close now, the time it ended)."""
    csock, usock = conn.raw, up.sock
    out = head
    try:
        if expect and not body_read:
            # Let the upstream decide whether it wants the body, as the client asked.
            await _send(usock, out)
            out = bytearray()
            ev = await _up_event(up)
            h = ev[1]
            if h.status == 100:
                await _up_end(up)
                await _to_client(csock, b"HTTP/1.1 100 Continue\r\n\r\n")
            else:
                return await _answer(state, conn, req, up, h, t0, answer, lf, ef, abandon_body=True)
        # The request body, as it arrives; what is already here goes out with the head.
        sent = 0
        if not body_read:
            out, sent, ended = await _body(_client_recv(csock), parser, out, req.chunked, partial(_send, usock))
            if not ended:
                raise _ClientGone()
        if out and (rest := _send_now(usock, out)) is not None:
            await _send(usock, rest)
    except OSError as e:
        raise UpstreamError(e.strerror or str(e)) from None
    lf.bytes_in += sent
    ef.bytes_in += sent
    while True:
        ev = await _up_event(up)
        h = ev[1]
        if 100 <= h.status < 200 and h.status != 101:
            await _up_end(up)
            hs = _headers_for(h.headers, None)
            await _to_client(csock, bytes(_head_bytes(b"HTTP/1.1 %d %s\r\n" % (h.status, h.reason), hs)))
            continue
        return await _answer(state, conn, req, up, h, t0, answer, lf, ef, abandon_body=False)


async def _body(recv: Callable[[], Awaitable[bytes]], parser: Parser, out: bytearray, chunked: bool,
                send: Callable[[bytearray], Awaitable[None]]) -> tuple[bytearray, int, bool]:
    """Stream one message body as it arrives, appended to `out` (chunked: re-framed) and
    sent whenever `out` holds RECV bytes or before waiting for more. Returns what is left
    in `out`, the body's bytes, and whether the message ended (False: its sender closed
    first)."""
    n = 0
    events = parser.events
    while True:
        if not events:
            if out:
                await send(out)
                out = bytearray()
            data = await recv()
            if not data:
                return out, n, False
            parser.feed(data)
            continue
        ev = events.popleft()
        if ev[0] == "data":
            d = ev[1]
            if not d:
                continue
            n += len(d)
            out += (b"%x\r\n" % len(d) + d + b"\r\n") if chunked else d
            if len(out) >= RECV:
                await send(out)
                out = bytearray()
                await trio.lowlevel.checkpoint()
        elif ev[0] == "end":
            if chunked:
                out += b"0\r\n\r\n"
            return out, n, True
        else:  # a new head before this body ended: garbage framing
            raise _ClientGone()


def _client_recv(sock: socket.socket) -> Callable[[], Awaitable[bytes]]:
    """Reads from the client for _body: its failures are the client's, not the upstream's."""

    async def recv() -> bytes:
        try:
            return await _recv(sock)
        except OSError:
            raise _ClientGone() from None

    return recv


async def _up_event(up: Upstream) -> tuple[Any, ...]:
    try:
        ev = await _event(up.sock, up.parser)
    except (OSError, httptools.HttpParserError) as e:
        raise UpstreamError(str(e) or type(e).__name__) from None
    if ev is None:
        raise UpstreamError("closed the connection")
    if ev[0] != "head":
        raise UpstreamError(f"unexpected {ev[0]}")
    return ev


async def _up_end(up: Upstream) -> None:
    """The end of an interim (1xx) answer, which has no body."""
    try:
        ev = await _event(up.sock, up.parser)
    except (OSError, httptools.HttpParserError) as e:
        raise UpstreamError(str(e) or type(e).__name__) from None
    if ev is None or ev[0] != "end":
        raise UpstreamError("bad interim answer")


async def _to_client(sock: socket.socket, data: bytes | bytearray | memoryview) -> None:
    try:
        await _send(sock, data)
    except OSError:
        raise _ClientGone() from None


async def _answer(state: ListenerState, conn: Conn, req: Head, up: Upstream, h: Head, t0: float,
                  answer: list[bool], lf: Any, ef: Any, *, abandon_body: bool) -> tuple[int, float, bool, bool, float]:
    now = trio.current_time()  # one clock read for the latency, and the verdict if nothing streams
    latency = now - t0
    status = h.status
    no_body = req.method == b"HEAD" or status in (204, 304)
    close_client = state.closing or abandon_body or not req.keep_alive
    rechunk = False
    framing = b""
    if no_body:
        pass
    elif h.length is not None and not h.chunked:
        pass  # content-length passes as is
    elif req.version == "1.1":
        # Chunked, or delimited by the upstream closing: chunked to the client either way.
        rechunk = True
        framing = b"transfer-encoding: chunked\r\n"
    else:
        close_client = True  # an HTTP/1.0 client: the end of the connection ends the body
    if close_client:
        framing += b"connection: close\r\n"
    if h.raw is not None and not rechunk:  # a plain head (heads.py): its lines pass on as they came
        out = bytearray(h.lines + framing + b"\r\n")
    else:
        headers = _headers_for(h.headers, None)
        if rechunk:
            headers = [(n, v) for n, v in headers if n != b"content-length"]
        out = _head_bytes(b"HTTP/1.1 %d %s\r\n" % (status, h.reason), headers, framing)
    answer[0] = True
    csock, usock, parser = conn.raw, up.sock, up.parser
    got = 0
    reusable = h.keep_alive
    if req.method == b"HEAD":
        # llhttp cannot be told a HEAD answer has no body: never reuse after one.
        reusable = False
        await _to_client(csock, out)
    else:
        events = parser.events
        try:
            if not rechunk and events and events[-1][0] == "end" and (len(events) == 1 or (
                    len(events) == 2 and events[0][0] == "data")):
                # The whole answer is here already (as heads.py leaves a plain one): no
                # streaming, one send, no coroutine unless the client's buffer is full.
                if len(events) == 2:
                    got = len(events[0][1])
                    out += events[0][1]
                events.clear()
            else:
                out, got, ended = await _body(partial(_recv, usock), parser, out, rechunk,
                                              partial(_to_client, csock))
                now = trio.current_time()
                if not ended:
                    if not (parser.in_message and h.length is None and not h.chunked):
                        raise _ClientGone()  # cut mid-answer: nothing to retry; cut the client off
                    reusable = False  # a body delimited by the close: complete
                    if rechunk:
                        out += b"0\r\n\r\n"
            if (rest := _send_now(csock, out)) is not None:
                await _to_client(csock, rest)
        except (OSError, httptools.HttpParserError):
            raise _ClientGone() from None
    lf.bytes_out += got
    ef.bytes_out += got
    return status, latency, reusable and not abandon_body, close_client, now


async def _upgrade(state: ListenerState, conn: Conn, parser: Parser, req: Head, service: str) -> None:
    """Pick, connect, pass the request on as it came (Upgrade kept), then tunnel bytes."""
    cfg = state.config
    try:
        held, usock = await connect_picked(state.rt, state.figures, service, Try(cfg.connect_timeout, cfg.retries),
                                           source=conn.peer_ip)
    except NoEndpoint as e:
        await _error(conn.raw, 503, f"no endpoint for {service}: {e.message}")
        return
    except UpstreamFailed as e:
        await _error(conn.raw, 502, str(e))
        return
    headers = [(n, v) for n, v in req.headers if n != b"x-forwarded-for"]
    headers.append((b"x-forwarded-for", conn.peer_ip.encode()))
    head = _head_bytes(req.method + b" " + req.target + b" HTTP/1.1\r\n", headers)
    ef = state.figures.endpoint(service, held.endpoint.id)
    ef.requests += 1
    ef.active += 1
    tunnel: Tunnel | None = None
    idle: Idle | None = None
    try:
        await _send(usock, head + parser.upgrade_data)
        with trio.CancelScope() as idle_scope:
            idle = Idle(idle_scope, cfg.idle_timeout)
            state.idles.add(idle)
            tunnel = Tunnel(conn.raw, usock, idle, lambda n: None, lambda n: None, use_splice=state.use_splice)
            state.relay().add(tunnel)
            await tunnel.done.wait()
    except OSError:
        pass
    finally:
        if tunnel is not None:
            tunnel.abort()
        state.idles.discard(idle)
        ef.active -= 1
        usock.close()
        if tunnel is None or tunnel.broken:
            release(state.rt, held)
        else:
            finish(state.rt, held, ok=True, latency=None)
