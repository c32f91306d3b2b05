"""tcp mode: one pick per client connection, held for its life; bytes spliced both ways."""

from __future__ import annotations

import logging

import trio

from .listener import Conn, ListenerState
from .picks import finish, release
from .relay import Idle, Tunnel, reset
from .upstream import NoEndpoint, Try, UpstreamFailed, connect_picked

log = logging.getLogger("softlb.proxy")


async def serve_tcp(state: ListenerState, conn: Conn) -> None:
    cfg = state.config
    client = conn.raw
    try:
        held, upstream = await connect_picked(state.rt, state.figures, state.service,
                                              Try(cfg.connect_timeout, cfg.retries), source=conn.peer_ip)
    except (NoEndpoint, UpstreamFailed) as e:
        log.warning("%s proxy: %s; closing the client connection", state.service, e)
        reset(client)
        return
    lf = state.figures.listener(state.service)
    ef = state.figures.endpoint(state.service, held.endpoint.id)
    lf.requests += 1
    ef.requests += 1
    ef.active += 1
    conn.endpoint_id = held.endpoint.id
    latency = trio.current_time() - held.started

    def up(n: int) -> None:
        lf.bytes_in += n
        ef.bytes_in += n

    def down(n: int) -> None:
        lf.bytes_out += n
        ef.bytes_out += n

    # One scope for everything that ends the tunnel early: the endpoint's drain running
    # out, the idle sweep, the listener's cut. The bytes move in the listener's relay.
    scope = trio.CancelScope()
    work = state.track(state.service, held.endpoint.id, scope)
    idle = Idle(scope, cfg.idle_timeout)
    state.idles.add(idle)
    tunnel = Tunnel(client, upstream, idle, up, down, use_splice=state.use_splice)
    try:
        with scope:
            state.relay().add(tunnel)
            await tunnel.done.wait()
    finally:
        tunnel.abort()  # cut short (drain, idle, agent stop): both sides hear a reset
        state.idles.discard(idle)
        state.work.discard(work)
        ef.active -= 1
        upstream.close()
        if tunnel.broken:
            release(state.rt, held)  # a reset mid-stream: which side caused it is unknown
        else:
            finish(state.rt, held, ok=True, latency=latency)
