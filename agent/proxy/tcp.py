"""tcp mode: one pick per client connection, held for its life; bytes spliced both ways."""

from __future__ import annotations

import logging
import socket
import struct

import trio

from .listener import Conn, ListenerState
from .picks import finish, release
from .pump import Idle, pump
from .upstream import NoEndpoint, Try, UpstreamFailed, connect_picked

log = logging.getLogger("softlb.proxy")
_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN: the peer must see the failure, not a clean end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass


async def serve_tcp(state: ListenerState, conn: Conn) -> None:
    cfg = state.config
    client = conn.raw
    try:
        held, upstream = await connect_picked(state.rt, state.figures, state.service,
                                              Try(cfg.connect_timeout, cfg.retries), source=conn.peer_ip)
    except (NoEndpoint, UpstreamFailed) as e:
        log.warning("%s proxy: %s; closing the client connection", state.service, e)
        _reset(client)
        return
    lf = state.figures.listener(state.service)
    ef = state.figures.endpoint(state.service, held.endpoint.id)
    lf.requests += 1
    ef.requests += 1
    ef.active += 1
    conn.endpoint_id = held.endpoint.id
    latency = trio.current_time() - held.started
    broken = False

    def up(n: int) -> None:
        lf.bytes_in += n
        ef.bytes_in += n

    def down(n: int) -> None:
        lf.bytes_out += n
        ef.bytes_out += n

    # One scope for everything that ends the tunnel early: the endpoint's drain running
    # out, the idle sweep, a reset on either side.
    scope = trio.CancelScope()
    work = state.track(state.service, held.endpoint.id, scope)
    idle = Idle(scope, cfg.idle_timeout)
    state.idles.add(idle)
    use_splice = state.use_splice

    async def one_way(src: socket.socket, dst: socket.socket, count) -> None:
        nonlocal broken
        try:
            await pump(src, dst, idle, count, use_splice=use_splice)
        except OSError:
            broken = True
            scope.cancel()

    try:
        with scope:
            async with trio.open_nursery() as n:
                n.start_soon(one_way, upstream, client, down)
                await one_way(client, upstream, up)  # this task carries one direction itself
        if broken or scope.cancelled_caught:
            # A reset on either side, idle too long, or drained: the other side hears a reset too.
            _reset(client)
            _reset(upstream)
    finally:
        state.idles.discard(idle)
        state.work.discard(work)
        ef.active -= 1
        upstream.close()
        if broken:
            release(state.rt, held)  # a reset mid-stream: which side caused it is unknown
        else:
            finish(state.rt, held, ok=True, latency=latency)
