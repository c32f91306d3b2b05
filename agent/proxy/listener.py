"""One proxy listener: its accept loop, connection cap, per-connection bookkeeping, drain.

Written so it can move onto the agent's shared listener module when that lands: the mode
handlers (tcp.py, http1.py, http2.py) only see `ListenerState` and `Conn`.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from functools import partial
from typing import Any, Awaitable, Callable

import trio

from softlb import ProxyConfig

from ..runtime import Runtime
from .fds import FdRoom
from .figures import ProxyFigures
from .picks import serving
from .relay import Relay, splice_available

log = logging.getLogger("softlb.proxy")

#: How long an idle keep-alive connection is kept open once its listener drains.
KEEPALIVE_GRACE = 0.5
#: How often open work is checked against the endpoints still serving (drain start).
DRAIN_CHECK = 0.25
#: Connections accepted in a row before the accept loop lets the others run.
ACCEPT_BATCH = 16
#: How often a listener stopped for want of fds looks again.
FD_RECHECK = 0.1


@dataclass(eq=False, slots=True)
class Work:
    """Something bound to one endpoint (a tcp connection, an http request, a pooled
    upstream): cancelled once its endpoint has been leaving for drain_timeout."""

    service: str
    endpoint_id: str
    scope: trio.CancelScope
    leaving_since: float | None = None
    #: The scope's own deadline (an http request's timeout), restored if the endpoint
    #: comes back before its drain ran out.
    deadline: float = float("inf")


class Conn:
    """One accepted client connection. `raw` is the non-blocking stdlib socket (tcp and
    http drive it with trio.lowlevel waits: a trio socket's every successful call ends
    in a scheduler pass); `sock`, trio's wrapper of it, is made on first use (http2)."""

    __slots__ = ("raw", "peer_ip", "between", "endpoint_id", "_sock", "keepalive_grace", "tried")

    def __init__(self, raw: socket.socket, peer_ip: str) -> None:
        self.raw = raw
        self.peer_ip = peer_ip
        #: The scope of a keep-alive wait between requests (a handler sets it), which the
        #: listener's drain gives a deadline.
        self.between: trio.CancelScope | None = None
        self.endpoint_id: str | None = None
        self._sock: trio.socket.SocketType | None = None
        #: How the listener's drain ends a keep-alive wait (`deadline`); handlers whose
        #: connection scope also covers requests (http1) put their own here.
        self.keepalive_grace: Callable[[float], None] = self._grace
        #: Endpoints whose connect failed (and was reported) before the handler ran.
        self.tried: list[str] | None = None

    @property
    def sock(self) -> trio.socket.SocketType:
        if self._sock is None:
            self._sock = trio.socket.from_stdlib_socket(self.raw)
        return self._sock

    def _grace(self, deadline: float) -> None:
        if self.between is not None:
            self.between.deadline = min(self.between.deadline, deadline)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        else:
            self.raw.close()


class ListenerState:
    """What handlers read: the config (replaced in place on reload), figures, open work."""

    def __init__(self, rt: Runtime, service: str, config: ProxyConfig, figures: ProxyFigures,
                 fd_room: FdRoom | None = None) -> None:
        self.rt = rt
        #: The fd budget every proxy listener shares (fds.py).
        self.fd_room = fd_room if fd_room is not None else FdRoom(lambda: rt.config.fd_reserve)
        self.service = service
        #: What this listener's requests queue under in the agent's `Turns` once a pass's
        #: budget is spent (agent/turns.py): TCP peers are one group there whatever their
        #: address, and within it one listener's requests keep their order.
        self.turn_key = f"proxy/{service}"
        self.config = config
        self.figures = figures
        self.use_splice = splice_available()
        self.conns: set[Conn] = set()
        self.work: set[Work] = set()
        #: Set when the listener stops accepting: keep-alive connections close after the
        #: request in progress.
        self.closing = False
        #: Per-mode state kept across connections (the http upstream pool).
        self.extra: dict[str, object] = {}
        #: Where tasks outliving one client connection run (shared upstream readers).
        self.nursery: trio.Nursery | None = None
        #: Called with `now` on every drain check (pooled connection upkeep).
        self.sweepers: list[Callable[[float], None]] = []
        #: Idle timers of open tunnels (tcp connections, upgraded http) and http1
        #: connections' deadlines, swept with the drain.
        self.idles: set[Any] = set()
        self._relay: Relay | None = None

    def relay(self) -> Relay:
        """The listener's relay (tcp tunnels), its task started on first use."""
        if self._relay is None:
            assert self.nursery is not None
            self._relay = Relay(self.rt.turns, self.turn_key)
            self.nursery.start_soon(self._relay.run)
        return self._relay

    def track(self, service: str, endpoint_id: str, scope: trio.CancelScope) -> Work:
        w = Work(service, endpoint_id, scope, None, scope.deadline)
        self.work.add(w)
        return w

    def check_drain(self, now: float) -> None:
        """Give work on endpoints that stopped serving drain_timeout to finish."""
        for w in list(self.work):
            if serving(self.rt, w.service, w.endpoint_id):
                if w.leaving_since is not None:  # back before its drain ran out
                    w.leaving_since = None
                    w.scope.deadline = w.deadline
            elif w.leaving_since is None:
                w.leaving_since = now
                w.scope.deadline = min(w.scope.deadline, now + self.config.drain_timeout)
            elif now >= w.scope.deadline:
                w.scope.cancel()  # trio did for a scope a task is in; a tunnel with none needs this


Handler = Callable[[ListenerState, Conn], Awaitable[None]]
#: Sets a connection up without a task when it can (tcp.start_tcp): True if it did, and
#: then calls the given function once the connection is over; False: run the Handler.
Starter = Callable[[ListenerState, Conn, Callable[[], None]], bool]


class ProxyListener:
    def __init__(self, state: ListenerState, sock: socket.socket, handler: Handler, where: str,
                 starter: Starter | None = None) -> None:
        self.state = state
        self.sock = sock
        self.where = where
        self.handler = handler
        self.starter = starter
        sock.setblocking(False)
        self.limiter = trio.CapacityLimiter(state.config.max_connections)
        self._accept_scope = trio.CancelScope()
        self._conn_scope = trio.CancelScope()
        self._closed = False
        self.done = trio.Event()

    def update(self, config: ProxyConfig) -> None:
        """New settings for connections from now on (listen and mode never change here)."""
        self.state.config = config
        self.limiter.total_tokens = config.max_connections

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._conn_scope:
                async with trio.open_nursery() as nursery:
                    self.state.nursery = nursery
                    nursery.start_soon(self._drain_checker)
                    task_status.started()
                    with self._accept_scope:
                        await self._accept(nursery)
                    # Stopped accepting: the handlers still running finish (bounded by retire).
                    while self.state.conns:
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
        finally:
            self._close_listener()
            self.done.set()

    def _close_listener(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)  # wakes the accept loop if it waits
            self.sock.close()

    async def _accept(self, nursery: trio.Nursery) -> None:
        state = self.state
        lsock = self.sock
        limiter = self.limiter
        lf = state.figures.listener(state.service)
        room = state.fd_room
        accepted = 0
        while True:
            token = object()
            try:
                limiter.acquire_on_behalf_of_nowait(token)
            except trio.WouldBlock:  # at max_connections: the kernel queues the rest
                await limiter.acquire_on_behalf_of(token)
            if not room.has_room():
                try:
                    await self._wait_for_fds()
                except BaseException:
                    limiter.release_on_behalf_of(token)
                    raise
            while True:
                try:
                    sock, addr = lsock.accept()
                    break
                except BlockingIOError:
                    accepted = 0
                    try:
                        await trio.lowlevel.wait_readable(lsock)
                    except (trio.ClosedResourceError, trio.Cancelled):
                        limiter.release_on_behalf_of(token)
                        if self._closed:
                            return
                        raise
                except OSError as e:
                    if self._closed or lsock.fileno() < 0:
                        limiter.release_on_behalf_of(token)
                        return
                    # EMFILE and friends: the agent is out of something; wait rather than spin.
                    log.warning("%s proxy: accept failed: %s", state.service, e)
                    await trio.sleep(0.1)
            room.took()
            sock.setblocking(False)
            try:
                # Answers go out in as few writes as can be, and nothing may wait for an ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            conn = Conn(sock, addr[0] if isinstance(addr, tuple) else "")
            state.conns.add(conn)
            lf.active += 1
            lf.connections += 1
            if self.starter is None or not self._start(conn, token):
                nursery.start_soon(self._serve, conn, token)
            accepted += 1
            if room.near or accepted % ACCEPT_BATCH == 0:
                await trio.lowlevel.checkpoint()  # a connection flood takes turns too

    async def _wait_for_fds(self) -> None:
        """The agent's fds are within fd_reserve of the limit: new connections wait in the
        kernel's queue (as at max_connections) until fds are released."""
        state = self.state
        state.figures.fd_waits += 1
        log.warning("%s proxy: open fds near the limit minus agent.fd_reserve (%d): not accepting until "
                    "some are released", state.service, state.rt.config.fd_reserve)
        while not state.fd_room.has_room():
            await trio.sleep(FD_RECHECK)
        log.info("%s proxy: accepting again", state.service)

    def _start(self, conn: Conn, token: object) -> bool:
        assert self.starter is not None
        try:
            return self.starter(self.state, conn, partial(self._done, conn, token))
        except Exception:
            log.exception("%s proxy: connection from %s failed", self.state.service, conn.peer_ip)
            self._done(conn, token)
            return True

    async def _serve(self, conn: Conn, token: object) -> None:
        try:
            await self.handler(self.state, conn)
        except Exception:
            log.exception("%s proxy: connection from %s failed", self.state.service, conn.peer_ip)
        finally:
            self._done(conn, token)

    def _done(self, conn: Conn, token: object) -> None:
        state = self.state
        conn.close()
        state.conns.discard(conn)
        state.figures.listener(state.service).active -= 1
        self.limiter.release_on_behalf_of(token)

    async def _drain_checker(self) -> None:
        while True:
            await trio.sleep(DRAIN_CHECK)
            now = trio.current_time()
            self.state.check_drain(now)
            for sweep in self.state.sweepers:
                sweep(now)
            for idle in list(self.state.idles):
                idle.sweep(now)

    def stop_accepting(self) -> None:
        """Close the listening socket now, so its address is free for a successor (under
        socket activation systemd keeps its copy and queues new connections for the next
        agent)."""
        self.state.closing = True
        self._accept_scope.cancel()
        self._close_listener()

    async def retire(self) -> None:
        """Stop accepting; let open connections finish within drain_timeout; then cut them."""
        self.stop_accepting()
        # Keep-alive connections between requests get a short grace: a request already on
        # its way (wrk and most clients send the next one at once) is answered, with
        # `Connection: close`, instead of meeting a closed connection it cannot retry.
        grace = trio.current_time() + min(KEEPALIVE_GRACE, self.state.config.drain_timeout)
        for c in list(self.state.conns):
            c.keepalive_grace(grace)
        with trio.move_on_after(self.state.config.drain_timeout):
            await self.done.wait()
        self._conn_scope.cancel()
        await self.done.wait()
