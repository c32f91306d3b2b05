"""The one listener: accept, caps, per-connection bookkeeping and drain, for every port the
agent serves (the IPC socket and loopback port, the admin port, the proxy listeners).

    budget = ConnectionBudget(ConnectionLimits.from_config(rt.config), rt.stats)

    async def handler(conn: Connection) -> None:
        ...  # conn.sock (non-blocking, never close it), conn.peer, conn.touch(),
             # await conn.wait_readable(), conn.draining, with conn.busy(): ...

    await nursery.start(partial(serve_listener, sock, handler, budget, name="ipc",
                                draining=event, refuse=goodbye))

Why one module: one agent serves every process on the host, so whatever one caller can make
it hold (sockets, tasks, buffers) must be bounded in one place, the same way for every port,
or the agent's worst case becomes the host's (issue 10).

Caps, checked at accept before the handler runs:
- `max_connections` over every listener sharing the budget, lowered at start to fit the
  process's fd limit minus `fd_reserve`, so the agent's own probes, Consul queries and
  snapshot writes never fail for lack of fds however many callers connect.
- `max_connections_per_uid` per peer uid (SO_PEERCRED on Unix sockets). All TCP peers count
  as one peer, "tcp": a loopback port cannot tell local users apart (any user on the host
  reaches it; `listen = ""` turns it off).
- `allow_uids` / `allow_gids` (Unix sockets): when either is non-empty, only peers whose uid
  is listed or whose primary gid is listed get in; root and the agent's own uid always do.
A refused connection is closed at once, after `refuse(reason)` bytes are sent best-effort
(non-blocking: a refusal must never cost the agent a wait), and counted.

Idle connections: a sweeper closes (shutdown, so the handler's next read sees EOF) every
connection that has not called `touch()` for `idle_timeout` and is not inside `busy()`.
One timestamp write per request, no cancel scope per wait: the hot path stays as it was.

Drain (`draining` set): accepting stops at once (under systemd, connections that arrive now
wait in its socket for the next agent); handlers parked in `wait_readable` are woken and see
`conn.draining`; `serve_listener` returns once every handler has returned.

Error policy (trio's, written down): accept errors in ACCEPT_CAPACITY_ERRNOS are logged and
retried after ACCEPT_BACKOFF; those in ACCEPT_SKIP_ERRNOS skip one connection; others
propagate (a broken listener). A handler's failure ends only its connection: OSError and
trio.BrokenResourceError quietly, anything else logged with its traceback and counted as
INTERNAL. Cancellation propagates, so a shutdown stays one cancel.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import resource
import socket
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator

import trio

if TYPE_CHECKING:
    from softlb import AgentConfig

    from .lot import Lot
    from .runtime import Stats

log = logging.getLogger("softlb.listeners")

#: Out of file descriptors or buffers: log, back off and keep accepting (trio's own policy).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: One connection that died before we accepted it (or that a security module refused):
#: skip it and accept the next. Anything else is a broken listener and propagates.
ACCEPT_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET})
ACCEPT_BACKOFF = 0.1
#: Connections accepted in a row before the accept loop yields to the connections' tasks
#: (each new connection's first step runs in the next pass, outside the budget: 8 made a
#: connection flood's passes ~0.5 ms longer, see turns.END_COST).
ACCEPT_BATCH = 4
#: Below this many connections the fd limit is too low to serve; say so at start.
MIN_USEFUL_CONNECTIONS = 16

Handler = Callable[["Connection"], Awaitable[None]]
Refuse = Callable[[str], bytes]


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 4096
    max_connections_per_uid: int = 1024
    idle_timeout: float = 300.0  # 0 disables
    fd_reserve: int = 128
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()

    @classmethod
    def from_config(cls, config: AgentConfig) -> ConnectionLimits:
        return cls(
            max_connections=config.max_connections,
            max_connections_per_uid=config.max_connections_per_uid,
            idle_timeout=config.idle_timeout,
            fd_reserve=config.fd_reserve,
            allow_uids=frozenset(config.allow_uids),
            allow_gids=frozenset(config.allow_gids),
        )


@dataclass(frozen=True)
class Peer:
    """Who is on the other end. uid/gid/pid from SO_PEERCRED (Unix), address on TCP."""

    family: int
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    address: str = ""

    #: "uid:pid" on a Unix socket, the IP on TCP: the `source` affinity policies hash, and
    #: the key connections take turns by (agent/turns.py).
    source: str = field(init=False, compare=False)
    #: What the per-peer cap counts by.
    bucket: str = field(init=False, compare=False)
    #: Whose open connections decide whether this peer is light (agent/lot.py): the
    #: process on the Unix socket; all of TCP together, since any local user can connect
    #: from as many of 127.0.0.0/8's addresses as it likes.
    crowd: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # Worked out once: asked at every wait of the connection (agent/lot.py).
        if self.family == socket.AF_UNIX:
            unix = self.uid is not None
            object.__setattr__(self, "source", f"{self.uid}:{self.pid}" if unix else "unix")
            object.__setattr__(self, "bucket", f"uid:{self.uid}" if unix else "unix")
            object.__setattr__(self, "crowd", self.source)
        else:
            object.__setattr__(self, "source", self.address.rsplit(":", 1)[0].strip("[]") or "tcp")
            object.__setattr__(self, "bucket", "tcp")
            object.__setattr__(self, "crowd", "tcp")

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"uid {self.uid} pid {self.pid}" if self.uid is not None else "unix peer"
        return f"tcp {self.address}"

    @classmethod
    def of(cls, sock: socket.socket, family: int | None = None) -> Peer:
        """`family`: the listener's, if known (`sock.family` makes an enum each time)."""
        if family is None:
            family = sock.family
        if family == socket.AF_UNIX:
            try:
                cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            except OSError:
                return cls(socket.AF_UNIX)
            # One Peer per process, shared by its connections (it is immutable): a process
            # opening connections as fast as it can made one each, a tenth of what the
            # agent spent accepting in the connection flood.
            peer = _unix_peers.get(cred)
            if peer is None:
                if len(_unix_peers) >= _UNIX_PEERS_MAX:
                    _unix_peers.clear()
                pid, uid, gid = struct.unpack("3i", cred)
                peer = _unix_peers[cred] = cls(socket.AF_UNIX, uid, gid, pid)
            return peer
        try:
            host, port = sock.getpeername()[:2]
        except OSError:
            return cls(family, address="tcp")
        return cls(family, address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


#: Unix-socket peers by their SO_PEERCRED bytes (Peer.of); emptied when it reaches the max.
_unix_peers: dict[bytes, Peer] = {}
_UNIX_PEERS_MAX = 4096


def fd_limit() -> int:
    """The soft RLIMIT_NOFILE, raised to the hard limit first when that is allowed: the
    usual daemon start-up step, since a default soft limit of 1024 is what runs out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class ConnectionBudget:
    """Connection counts shared by the listeners that draw on it (one per cap group)."""

    def __init__(self, limits: ConnectionLimits, stats: Stats, *, nofile: int | None = None,
                 counted_as: str = "connections", refused: collections.Counter[str] | None = None) -> None:
        self.limits = limits
        self.stats = stats
        #: Refusals by reason ("limit", "peer_limit", "denied"): the callers' ports share
        #: `stats.connections_refused`; a port counted apart brings its own.
        self.refused = stats.connections_refused if refused is None else refused
        #: Which Stats counters this budget's connections show in: `connections_open/_total`
        #: for the host's callers, `admin_connections_open/_total` for the admin port.
        self._open_field, self._total_field = f"{counted_as}_open", f"{counted_as}_total"
        nofile = fd_limit() if nofile is None else nofile
        room = nofile - limits.fd_reserve
        #: max_connections as it applies: never into the fd reserve.
        self.max_connections = max(1, min(limits.max_connections, room))
        if self.max_connections < limits.max_connections:
            level = logging.WARNING if self.max_connections < MIN_USEFUL_CONNECTIONS else logging.INFO
            log.log(level, "fd limit %d minus fd_reserve %d: at most %d client connections (max_connections = %d)",
                    nofile, limits.fd_reserve, self.max_connections, limits.max_connections)
        self.open = 0
        self.per_peer: dict[str, int] = {}
        self._own_uid = os.geteuid()

    def admit(self, peer: Peer) -> str | None:
        """Take a slot for `peer`, or say why not: "denied", "limit" or "peer_limit"."""
        lim = self.limits
        if peer.family == socket.AF_UNIX and (lim.allow_uids or lim.allow_gids):
            uid = peer.uid
            if not (uid == 0 or uid == self._own_uid or uid in lim.allow_uids or peer.gid in lim.allow_gids):
                return "denied"
        if self.open >= self.max_connections:
            return "limit"
        n = self.per_peer.get(peer.bucket, 0)
        if n >= lim.max_connections_per_uid:
            return "peer_limit"
        self.per_peer[peer.bucket] = n + 1
        self.open += 1
        stats = self.stats
        setattr(stats, self._open_field, getattr(stats, self._open_field) + 1)
        setattr(stats, self._total_field, getattr(stats, self._total_field) + 1)
        return None

    def release(self, peer: Peer) -> None:
        self.open -= 1
        setattr(self.stats, self._open_field, getattr(self.stats, self._open_field) - 1)
        n = self.per_peer[peer.bucket] - 1
        if n:
            self.per_peer[peer.bucket] = n
        else:
            del self.per_peer[peer.bucket]


class _Drain:
    """Where the accept loop and the readers park, so a stop can wake them.

    Parking costs a set insert and removal, not a cancel scope: this wraps every wait of
    every connection, and the drain wakes the parked ones with `notify_closing` (or the
    lot's `wake`, for connections parked there).
    """

    __slots__ = ("event", "parked", "lot")

    def __init__(self, event: trio.Event | None, lot: Lot | None = None) -> None:
        self.event = event
        self.parked: set[socket.socket] = set()
        #: Where connections (not the listening socket) park, if not in trio: agent/lot.py.
        self.lot = lot

    @property
    def started(self) -> bool:
        return self.event is not None and self.event.is_set()

    async def wait_readable(self, sock: socket.socket, key: str | None = None, crowd: str | None = None) -> None:
        parked = self.parked
        parked.add(sock)
        try:
            if key is not None and self.lot is not None:
                await self.lot.wait_readable(sock, key, crowd)
            else:
                await trio.lowlevel.wait_readable(sock)
        except trio.ClosedResourceError:
            if not self.started:
                raise
        finally:
            parked.discard(sock)

    async def wait_writable(self, sock: socket.socket, key: str) -> None:
        """A blocked send's wait: in the lot when there is one (the drain's `wake` lets it
        go), else trio's (the drain's `notify_closing` on the parked reader wakes it)."""
        if self.lot is not None:
            await self.lot.wait_writable(sock, key)
        else:
            await trio.lowlevel.wait_writable(sock)

    async def run(self) -> None:
        assert self.event is not None
        await self.event.wait()
        lot = self.lot
        for sock in list(self.parked):
            if lot is not None:
                lot.wake(sock)  # a no-op unless parked there
            trio.lowlevel.notify_closing(sock)


class Connection:
    """One accepted connection, as its handler sees it (see the module docstring)."""

    _ids = 0
    __slots__ = ("id", "sock", "peer", "last_active", "_busy", "_drain", "closed_why")

    def __init__(self, sock: socket.socket, peer: Peer, drain: _Drain) -> None:
        Connection._ids += 1
        self.id = Connection._ids
        self.sock = sock
        self.peer = peer
        self.last_active = trio.current_time()
        self._busy = 0
        self._drain = drain
        #: Why the listener shut this connection down, if it did ("idle", ...).
        self.closed_why = ""

    @property
    def draining(self) -> bool:
        return self._drain.started

    def touch(self, now: float | None = None) -> None:
        self.last_active = trio.current_time() if now is None else now

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Not idle while inside (a watch stream, a proxied request)."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self.last_active = trio.current_time()

    @property
    def is_busy(self) -> bool:
        return self._busy > 0

    async def wait_readable(self) -> None:
        """Park until the socket is readable; returns early (nothing to read) at the drain."""
        peer = self.peer
        await self._drain.wait_readable(self.sock, peer.source, peer.crowd)

    async def wait_writable(self) -> None:
        """Park until the socket takes more (a send the kernel would not take whole)."""
        await self._drain.wait_writable(self.sock, self.peer.source)

    def close_soon(self, why: str) -> None:
        """Shut the socket down: the handler's next read sees EOF, its next send fails."""
        self.closed_why = why
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _only(e: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
    if isinstance(e, BaseExceptionGroup):
        return all(_only(x, kind) for x in e.exceptions)
    return isinstance(e, kind)


@dataclass
class _Open:
    conns: set[Connection] = field(default_factory=set)


async def serve_listener(
    listener: socket.socket,
    handler: Handler,
    budget: ConnectionBudget,
    *,
    name: str,
    draining: trio.Event | None = None,
    refuse: Refuse | None = None,
    lot: Lot | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on `listener` until `draining` is set, one task per connection running
    `handler(conn)`; return once every handler has returned. See the module docstring.
    With `lot`, idle connections wait there, woken a bounded number per pass by peer."""
    listener.setblocking(False)
    drain = _Drain(draining, lot)
    live = _Open()
    stats = budget.stats
    async with trio.open_nursery() as nursery:
        if draining is not None:
            nursery.start_soon(drain.run)
        sweeper = trio.CancelScope()
        if budget.limits.idle_timeout > 0:
            nursery.start_soon(_sweep_idle, live, budget, name, sweeper)
        task_status.started()
        accepted = 0
        family, kind, proto = int(listener.family), int(listener.type), listener.proto
        accept, new_socket = listener._accept, socket.socket  # type: ignore[attr-defined]
        while not drain.started:
            try:
                # What `listener.accept()` does, without asking the listener for its family
                # and type (an enum made each time) per connection.
                sock = new_socket(family, kind, proto, fileno=accept()[0])
            except BlockingIOError:
                await drain.wait_readable(listener)
                continue
            except OSError as e:
                if e.errno in ACCEPT_SKIP_ERRNOS:
                    continue
                if e.errno in ACCEPT_CAPACITY_ERRNOS:
                    stats.accept_capacity_errors += 1
                    log.error("%s: accept failed (%s); retrying in %.1fs", name, e, ACCEPT_BACKOFF)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                raise
            sock.setblocking(False)
            peer = Peer.of(sock, family)
            why = budget.admit(peer)
            if why is not None:
                budget.refused[why] += 1
                _refuse(sock, refuse, why, name, peer, budget)
                # A flood of refusals must not keep the loop from everyone else.
                await trio.lowlevel.checkpoint()
                continue
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, peer, drain)
            live.conns.add(conn)
            if lot is not None:
                lot.opened(peer.crowd)
            nursery.start_soon(_run, handler, conn, budget, live, name)
            accepted += 1
            if accepted % ACCEPT_BATCH == 0:
                await trio.lowlevel.checkpoint()  # a connection flood takes turns too
        sweeper.cancel()  # draining: what is left closes as it goes idle


_REASONS = {
    "denied": "peer not in agent.allow_uids / agent.allow_gids",
    "limit": "agent.max_connections reached",
    "peer_limit": "agent.max_connections_per_uid reached for this peer",
}


def refusal_text(why: str) -> str:
    return _REASONS.get(why, why)


def _refuse(sock: socket.socket, refuse: Refuse | None, why: str, name: str, peer: Peer, budget: ConnectionBudget) -> None:
    # Rate-limit the log line by the counter: a flood logs its first refusals and then
    # one line per thousand, never one per attempt.
    n = budget.refused[why]
    if n <= 10 or n % 1000 == 0:
        log.warning("%s: refused a connection from %s: %s (%d refused so far)", name, peer, refusal_text(why), n)
    try:
        if refuse is not None:
            sock.send(refuse(why))
    except OSError:
        pass
    finally:
        sock.close()


async def _run(handler: Handler, conn: Connection, budget: ConnectionBudget, live: _Open, name: str) -> None:
    try:
        await handler(conn)
    except Exception as e:
        peer_gone = _only(e, (OSError, trio.BrokenResourceError, trio.ClosedResourceError))
        log.log(logging.DEBUG if peer_gone else logging.ERROR, "%s: connection %d (%s) ended: %r",
                name, conn.id, conn.peer, e, exc_info=not peer_gone)
        if not peer_gone:
            budget.stats.errors["INTERNAL"] += 1
    finally:
        live.conns.discard(conn)
        budget.release(conn.peer)
        lot = conn._drain.lot
        if lot is not None:
            lot.closed(conn.peer.crowd)
        conn.sock.close()


async def _sweep_idle(live: _Open, budget: ConnectionBudget, name: str, scope: trio.CancelScope) -> None:
    with scope:
        await _sweep(live, budget, name)


async def _sweep(live: _Open, budget: ConnectionBudget, name: str) -> None:
    timeout = budget.limits.idle_timeout
    period = min(max(timeout / 4, 0.05), 30.0)
    while True:
        await trio.sleep(period)
        cutoff = trio.current_time() - timeout
        idle = [c for c in live.conns if c.last_active < cutoff and not c.is_busy and not c.closed_why]
        for c in idle:
            log.debug("%s: closing connection %d (%s): idle for %.0fs", name, c.id, c.peer, timeout)
            budget.stats.connections_idle_closed += 1
            c.close_soon("idle")
