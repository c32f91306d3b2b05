"""tcp mode: one pick per client connection, held for its life; bytes spliced both ways.

A connection whose setup need not wait — its service known, its connect over when
`connect` returns (loopback) — costs no task: `start_tcp` picks, connects and joins the
listener's relay in the accept loop's turn, and the tunnel's end cleans up. Anything else
(a catalog source still fetching, a connect in progress or failed, retries and their
reports) runs `serve_tcp` in a task of its own. A task, a cancel scope and an event per
connection were a fifth of what a connection cost (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import Any, Callable

import trio

from .listener import Conn, ListenerState
from .picks import Held, finish, pick_now, release
from .relay import Idle, Tunnel, reset
from .upstream import IN_PROGRESS, LOCAL_ERRNOS, NoEndpoint, Try, UpstreamFailed, connect_now, connect_picked

log = logging.getLogger("softlb.proxy")

#: Endpoint addresses a connect completes on within the `connect` call.
_LOOPBACK = ("127.", "::1")


class _Cut:
    """A tunnel's stand-in for a cancel scope when no task waits on it: the idle sweep
    and the drain check (which sets `deadline`, then calls `cancel` once it has passed)
    end it by aborting the tunnel."""

    __slots__ = ("deadline", "tunnel")

    def __init__(self) -> None:
        self.deadline = math.inf
        self.tunnel: Tunnel | None = None

    def cancel(self) -> None:
        if self.tunnel is not None:
            self.tunnel.abort()


def _tunnel(state: ListenerState, conn: Conn, held: Held, upstream: socket.socket,
            scope: Any) -> tuple[Tunnel, Callable[[], None]]:
    """The bookkeeping of a connected pair (figures, drain, idle): its tunnel, not yet
    relayed, and what ends the bookkeeping once the tunnel is over."""
    cfg = state.config
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
    work = state.track(state.service, held.endpoint.id, scope)
    idle = Idle(scope, cfg.idle_timeout)
    state.idles.add(idle)
    tunnel = Tunnel(conn.raw, upstream, idle, up, down, use_splice=state.use_splice)

    def end() -> None:
        tunnel.abort()  # cut short (drain, idle, agent stop): both sides hear a reset
        state.idles.discard(idle)
        state.work.discard(work)
        ef.active -= 1
        upstream.close()
        if tunnel.broken:
            release(state.rt, held)  # a reset mid-stream: which side caused it is unknown
        else:
            finish(state.rt, held, ok=True, latency=latency)

    return tunnel, end


def start_tcp(state: ListenerState, conn: Conn, done: Callable[[], None]) -> bool:
    """Set the connection up with no task when nothing has to wait; `done` runs once its
    tunnel ended. False: nothing was kept; serve_tcp is to run in a task."""
    rt = state.rt
    try:
        held = pick_now(rt, state.service, source=conn.peer_ip)
    except NoEndpoint:
        return False  # serve_tcp says why and resets the client
    if held is None:
        return False
    ep = held.endpoint
    upstream, err = connect_now(ep.address, ep.port) if ep.address.startswith(_LOOPBACK) else (None, IN_PROGRESS)
    if upstream is None:
        if err == IN_PROGRESS or err in LOCAL_ERRNOS:
            release(rt, held)  # no verdict: serve_tcp tries again and reports what it meets
        else:  # refused: the endpoint's failure, one try of the budget; serve_tcp goes on
            finish(rt, held, ok=False, latency=trio.current_time() - held.started)
            state.figures.listener(state.service).failures += 1
            state.figures.endpoint(state.service, ep.id).failures += 1
            log.info("%s: connect to %s (%s:%d) failed: %s", state.service, ep.id, ep.address, ep.port,
                     os.strerror(err))
            conn.tried = [ep.id]
        return False
    state.figures.endpoint(state.service, ep.id).connections += 1
    cut = _Cut()
    tunnel, end = _tunnel(state, conn, held, upstream, cut)
    cut.tunnel = tunnel

    def ended() -> None:
        try:
            end()
        except Exception:
            log.exception("%s proxy: ending the connection from %s failed", state.service, conn.peer_ip)
        done()

    tunnel.on_end = ended
    state.relay().add(tunnel)  # may end it at once (a reset already waiting): then done ran
    return True


async def serve_tcp(state: ListenerState, conn: Conn) -> None:
    cfg = state.config
    client = conn.raw
    try:
        held, upstream = await connect_picked(state.rt, state.figures, state.service,
                                              Try(cfg.connect_timeout, cfg.retries), source=conn.peer_ip,
                                              tried=conn.tried)
    except (NoEndpoint, UpstreamFailed) as e:
        log.warning("%s proxy: %s; closing the client connection", state.service, e)
        reset(client)
        return
    scope = trio.CancelScope()
    tunnel, end = _tunnel(state, conn, held, upstream, scope)
    try:
        with scope:
            state.relay().add(tunnel)
            await tunnel.done.wait()
    finally:
        end()
