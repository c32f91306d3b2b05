"""http mode: HTTP/1.1 on h11, a pick per request over pooled keep-alive upstreams.

One client connection carries many requests; each is routed (Host, path prefix), picked
on its own (held lease for the request's life), sent over a pooled upstream connection
or a new one, and its answer streamed back as it arrives: bodies are never buffered
whole, in either direction. A connect failure moves on to another endpoint; so does a
reset before any answer, for idempotent requests without a body. Upgrades (WebSocket)
become a tcp tunnel after the pick.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import h11
import trio

from softlb import route

from .listener import KEEPALIVE_GRACE, Conn, ListenerState
from .picks import Held, NoEndpoint, finish, pick, release
from .pool import Pool
from .pump import Idle, pump
from .upstream import LOCAL_ERRNOS, Try, UpstreamFailed, connect_picked, open_socket_pair

log = logging.getLogger("softlb.proxy")

RECV = 64 * 1024
MAX_HEAD = 64 * 1024
#: Hop-by-hop headers (RFC 9110 7.6.1): they describe one connection, never forwarded.
#: transfer-encoding is re-made by h11 for each side's own framing.
HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
                 b"transfer-encoding"})
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
#: Reused pooled connections found closed by the server, retried at most this often per
#: request before counting as a failure (each one found is dropped from the pool).
STALE_RETRIES = 8


class UpstreamError(Exception):
    """The upstream failed before answering (reset, EOF, garbage): maybe retriable."""


@dataclass(eq=False, slots=True)
class Upstream:
    sock: trio.socket.SocketType
    raw: socket.socket  # the same socket, for the peek before reuse
    h11: h11.Connection
    key: tuple[str, int]
    reused: bool = False

    def close(self) -> None:
        self.sock.close()


def _pool(state: ListenerState) -> Pool[Upstream]:
    p = state.extra.get("pool")
    if p is None:
        p = state.extra["pool"] = Pool(Upstream.close)
    return p


async def _send(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


async def _next(sock: trio.socket.SocketType, conn: h11.Connection) -> object:
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(await sock.recv(RECV))
            continue
        return ev


def _headers_for(headers: list[tuple[bytes, bytes]], *, request: bool, xff: str | None) -> list[tuple[bytes, bytes]]:
    drop = HOP
    for name, value in headers:
        if name == b"connection":  # headers the Connection header names are hop-by-hop too
            drop = drop | {v.strip().lower() for v in value.split(b",")}
    out = []
    chunked = False
    prior_xff = None
    for name, value in headers:
        if name == b"transfer-encoding":
            chunked = True
        if name in drop:
            continue
        if name == b"x-forwarded-for" and xff is not None:
            prior_xff = value if prior_xff is None else prior_xff + b", " + value
            continue
        out.append((name, value))
    if request and chunked:
        out.append((b"transfer-encoding", b"chunked"))  # h11 frames a request body only as told
    if xff is not None:
        me = xff.encode()
        out.append((b"x-forwarded-for", prior_xff + b", " + me if prior_xff else me))
    return out


def _is_upgrade(req: h11.Request) -> bool:
    conn = b",".join(v for n, v in req.headers if n == b"connection").lower()
    return b"upgrade" in conn and any(n == b"upgrade" for n, _ in req.headers)


def _host(req: h11.Request) -> str:
    for n, v in req.headers:
        if n == b"host":
            return v.decode("latin-1")
    return ""


async def _error(sock: trio.socket.SocketType, client: h11.Connection, status: int, text: str) -> None:
    if client.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return  # an answer has begun: all that is left is closing the connection
    body = text.encode() + b"\n"
    data = client.send(h11.Response(status_code=status, headers=[
        (b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]))
    data += client.send(h11.Data(data=body)) + client.send(h11.EndOfMessage())
    try:
        await _send(sock, data)
    except OSError:
        pass


async def serve_http1(state: ListenerState, conn: Conn) -> None:
    sock = conn.sock
    client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    lf = state.figures.listener(state.service)
    while True:
        wait = KEEPALIVE_GRACE if state.closing else state.config.idle_timeout
        try:
            with trio.CancelScope(deadline=trio.current_time() + wait) as between:
                conn.between = between
                ev = await _next(sock, client)
        except h11.RemoteProtocolError as e:
            await _error(sock, client, e.error_status_hint, f"bad request: {e}")
            return
        except OSError:
            return
        if between.cancelled_caught or not isinstance(ev, h11.Request):
            return  # idle, draining, closed, or the connection's end
        lf.requests += 1
        keep = await _request(state, conn, client, ev)
        if not keep or client.our_state is not h11.DONE or client.their_state is not h11.DONE:
            return
        client.start_next_cycle()


async def _request(state: ListenerState, conn: Conn, client: h11.Connection, req: h11.Request) -> bool:
    """Forward one request; True if the client connection may carry another."""
    cfg = state.config
    service = route(cfg.routes, state.service, _host(req), req.target.decode("latin-1")) if cfg.routes else state.service
    if _is_upgrade(req):
        await _upgrade(state, conn, client, req, service)
        return False
    answered = False  # the client has seen a response head
    with trio.move_on_after(cfg.request_timeout) as timer:
        try:
            answered = await _exchange(state, conn, client, req, service)
        except NoEndpoint as e:
            await _error(conn.sock, client, 503, f"no endpoint for {service}: {e.message}")
            return False
        except UpstreamFailed as e:
            await _error(conn.sock, client, 502, str(e))
            return False
        except h11.RemoteProtocolError as e:
            await _error(conn.sock, client, 400, f"bad request: {e}")
            return False
        except _ClientGone:
            return False
    if timer.cancelled_caught:
        state.figures.listener(state.service).failures += 1
        await _error(conn.sock, client, 504, f"no complete answer from {service} within {cfg.request_timeout:g}s")
        return False
    return True


class _ClientGone(Exception):
    pass


async def _exchange(state: ListenerState, conn: Conn, client: h11.Connection, req: h11.Request, service: str) -> bool:
    cfg = state.config
    figures = state.figures
    lf = figures.listener(service)
    pool = _pool(state)
    headers = _headers_for(req.headers, request=True, xff=conn.peer_ip)
    out_req = h11.Request(method=req.method, target=req.target, headers=headers)
    has_body = any(n == b"transfer-encoding" for n, _ in headers) or any(
        n == b"content-length" and v != b"0" for n, v in headers)
    expect = any(n == b"expect" and v.lower() == b"100-continue" for n, v in req.headers)
    replayable = req.method in IDEMPOTENT and not has_body
    attempt = 0
    stale = 0
    tried: list[str] = []
    while True:
        held = await pick(state.rt, service, source=conn.peer_ip,
                          key=f"{conn.peer_ip}#retry{attempt}" if attempt else None)
        ep = held.endpoint
        ef = figures.endpoint(service, ep.id)
        key = (ep.address, ep.port)
        up = pool.get(key, cfg.idle_timeout)
        while up is not None and _closed(up.raw):  # the server closed it while it sat idle
            up.close()
            up = pool.get(key, cfg.idle_timeout)
        t0 = trio.current_time()
        if up is None:
            try:
                raw, sock = await open_socket_pair(ep.address, ep.port, cfg.connect_timeout)
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
            up = Upstream(sock, raw, h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD), key)
        else:
            up.reused = True
        ef.requests += 1
        ef.active += 1
        work = state.track(service, ep.id, trio.CancelScope())
        try:
            with work.scope:
                result = await _forward(state, conn, client, req, out_req, up, held, service, expect, lf, ef)
            if work.scope.cancelled_caught:  # the endpoint left and drain_timeout ran out
                up.close()
                release(state.rt, held)
                if client.our_state is h11.SEND_RESPONSE:
                    raise UpstreamFailed(f"{service}: endpoint {ep.id} left while answering")
                return True
        except UpstreamError as e:
            log.debug("%s: %s failed: %s (attempt %d)", service, ep.id, e, attempt)
            up.close()
            if up.reused and stale < STALE_RETRIES and result_unsent(client) and client.their_state is h11.DONE:
                # A pooled connection the server had closed: not the endpoint's fault.
                release(state.rt, held)
                stale += 1
                continue
            finish(state.rt, held, ok=False, latency=trio.current_time() - t0)
            lf.failures += 1
            ef.failures += 1
            tried.append(ep.id)
            if not result_unsent(client) or not replayable or attempt >= cfg.retries:
                if result_unsent(client):
                    raise UpstreamFailed(f"{service}: endpoint {ep.id} failed before answering: {e}") from None
                raise _ClientGone() from None  # mid-answer: all we can do is cut the client off
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
        status, latency = result
        finish(state.rt, held, ok=status < 500, latency=latency)
        if status >= 500:
            lf.failures += 1
            ef.failures += 1
        if up.h11.our_state is h11.DONE and up.h11.their_state is h11.DONE and not state.closing:
            up.h11.start_next_cycle()
            up.reused = False
            pool.put(key, up)
        else:
            up.close()
        return True


def _closed(sock: socket.socket) -> bool:
    """Whether an idle pooled connection was closed by its server (EOF or reset waiting):
    one non-blocking peek, cheaper than a failed request."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def result_unsent(client: h11.Connection) -> bool:
    return client.our_state is h11.SEND_RESPONSE


async def _forward(state: ListenerState, conn: Conn, client: h11.Connection, req: h11.Request,
                   out_req: h11.Request, up: Upstream, held: Held, service: str, expect: bool,
                   lf: object, ef: object) -> tuple[int, float]:
    """Send the request, stream the answer back; (status, seconds to the answer's head)."""
    csock, usock = conn.sock, up.sock
    t0 = trio.current_time()
    pending = up.h11.send(out_req)
    if expect:
        try:
            await _send(usock, pending)
        except OSError as e:
            raise UpstreamError(e.strerror or str(e)) from None
        pending = b""
        # Let the upstream decide whether it wants the body, as the client asked.
        ev = await _up_event(up)
        if isinstance(ev, h11.InformationalResponse):
            await _to_client(csock, client.send(ev))
        else:
            return await _answer(state, conn, client, up, ev, t0, drain_body=True)
    # The request body, as it arrives; what is already here goes out with the head.
    sent = 0
    out = bytearray(pending)
    try:
        if client.their_state is h11.DONE:  # a retry: the (empty) body was read already
            await _send(usock, bytes(out) + up.h11.send(h11.EndOfMessage()))
        while client.their_state is not h11.DONE:
            ev = client.next_event()
            if ev is h11.NEED_DATA:
                if out:
                    await _send(usock, bytes(out))
                    out.clear()
                try:
                    client.receive_data(await csock.recv(RECV))
                except OSError:
                    raise _ClientGone() from None
                continue
            if isinstance(ev, h11.Data):
                sent += len(ev.data)
                out += up.h11.send(ev)
                if len(out) >= RECV:
                    await _send(usock, bytes(out))
                    out.clear()
            elif isinstance(ev, h11.EndOfMessage):
                out += up.h11.send(ev)
                await _send(usock, bytes(out))
                break
            else:  # ConnectionClosed mid-body
                raise _ClientGone()
    except OSError as e:
        raise UpstreamError(e.strerror or str(e)) from None
    lf.bytes_in += sent  # type: ignore[attr-defined]
    ef.bytes_in += sent  # type: ignore[attr-defined]
    while True:
        ev = await _up_event(up)
        if isinstance(ev, h11.InformationalResponse):
            await _to_client(csock, client.send(h11.InformationalResponse(
                status_code=ev.status_code, headers=_headers_for(ev.headers, request=False, xff=None))))
            continue
        return await _answer(state, conn, client, up, ev, t0, drain_body=False, lf=lf, ef=ef)


async def _up_event(up: Upstream) -> object:
    try:
        ev = await _next(up.sock, up.h11)
    except (OSError, h11.RemoteProtocolError) as e:
        raise UpstreamError(str(e)) from None
    if isinstance(ev, h11.ConnectionClosed):
        raise UpstreamError("closed the connection")
    return ev


async def _to_client(sock: trio.socket.SocketType, data: bytes) -> None:
    try:
        await _send(sock, data)
    except OSError:
        raise _ClientGone() from None


async def _answer(state: ListenerState, conn: Conn, client: h11.Connection, up: Upstream, ev: object,
                  t0: float, *, drain_body: bool, lf: object = None, ef: object = None) -> tuple[int, float]:
    if not isinstance(ev, h11.Response):
        raise UpstreamError(f"unexpected {type(ev).__name__}")
    latency = trio.current_time() - t0
    headers = _headers_for(ev.headers, request=False, xff=None)
    if state.closing or drain_body:
        headers.append((b"connection", b"close"))  # draining: this is the connection's last answer
    # What is ready goes out in one send: head and body chunks are gathered until the
    # upstream has nothing more for now (separate small sends meet Nagle and delayed ACKs).
    out = bytearray(client.send(h11.Response(status_code=ev.status_code, headers=headers, reason=ev.reason)))
    csock, usock, uh11 = conn.sock, up.sock, up.h11
    got = 0
    try:
        while True:
            ev2 = uh11.next_event()
            if ev2 is h11.NEED_DATA:
                if out:
                    await _to_client(csock, bytes(out))
                    out.clear()
                uh11.receive_data(await usock.recv(RECV))
                continue
            if isinstance(ev2, h11.Data):
                got += len(ev2.data)
                out += client.send(ev2)
                if len(out) >= RECV:
                    await _to_client(csock, bytes(out))
                    out.clear()
            elif isinstance(ev2, h11.EndOfMessage):
                out += client.send(ev2)
                await _to_client(csock, bytes(out))
                break
            else:
                raise _ClientGone()
    except (OSError, h11.RemoteProtocolError):
        raise _ClientGone() from None  # mid-answer: nothing to retry; cut the client off
    if lf is not None:
        lf.bytes_out += got  # type: ignore[attr-defined]
        ef.bytes_out += got  # type: ignore[attr-defined]
    return ev.status_code, latency


async def _upgrade(state: ListenerState, conn: Conn, client: h11.Connection, req: h11.Request, service: str) -> None:
    """Pick, connect, pass the request on as it came (Upgrade kept), then tunnel bytes."""
    cfg = state.config
    try:
        held, usock = await connect_picked(state.rt, state.figures, service, Try(cfg.connect_timeout, cfg.retries),
                                           source=conn.peer_ip)
    except NoEndpoint as e:
        await _error(conn.sock, client, 503, f"no endpoint for {service}: {e.message}")
        return
    except UpstreamFailed as e:
        await _error(conn.sock, client, 502, str(e))
        return
    headers = [(n, v) for n, v in req.headers if n != b"x-forwarded-for"]
    headers.append((b"x-forwarded-for", conn.peer_ip.encode()))
    head = h11.Connection(h11.CLIENT).send(h11.Request(method=req.method, target=req.target, headers=headers))
    ef = state.figures.endpoint(service, held.endpoint.id)
    ef.requests += 1
    ef.active += 1
    broken = False
    try:
        await _send(usock, head + client.trailing_data[0])
        with trio.CancelScope() as idle_scope:
            idle = Idle(idle_scope, cfg.idle_timeout)
            idle.touch()

            async def one_way(a: trio.socket.SocketType, b: trio.socket.SocketType) -> None:
                nonlocal broken
                try:
                    await pump(a, b, idle, lambda n: None, use_splice=state.use_splice)
                except OSError:
                    broken = True
                    idle_scope.cancel()

            async with trio.open_nursery() as n:
                n.start_soon(one_way, conn.sock, usock)
                n.start_soon(one_way, usock, conn.sock)
    except OSError:
        broken = True
    finally:
        ef.active -= 1
        usock.close()
        finish(state.rt, held, ok=not broken, latency=None) if not broken else release(state.rt, held)
