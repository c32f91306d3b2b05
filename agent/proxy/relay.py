"""Moving bytes between two connected sockets, both ways, for tcp mode and upgraded http.

One task per listener (`Relay.run`) serves every tunnel of that listener from an epoll set
of its own, which trio waits on as one fd: a tunnel costs no task, nursery or trio wait of
its own once connected (those were most of a tcp connection's cost: ~20 µs a task, ~45 µs
a nursery, ~25 µs a trio wait, measured under this machine's load). Each readiness event
moves what it can without waiting: recv/send through one shared buffer while the reads are
small, then, from the first read that fills the buffer, splice(2) through a pipe (bulk
bytes never enter Python). A direction whose destination is full stops reading its
source and waits for the destination to drain (EPOLLOUT): backpressure both ways.

Half-close is passed on: end of stream from one side becomes shutdown(SHUT_WR) towards the
other, and the opposite direction keeps flowing until it ends too. A reset on either side
resets the other (SO_LINGER 0). The tunnel's owner awaits `Tunnel.done` inside its cancel
scope (drain, idle); when cancelled it calls `Tunnel.abort`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
from typing import Callable

import trio

#: Bytes moved per splice. Pipes are grown to this so one call moves a whole chunk.
CHUNK = 1024 * 1024
#: Chunks (or small reads) moved per direction per event, so one busy tunnel cannot hold
#: the loop (the epoll set is level-triggered: what is left is reported again).
BATCH = 16
#: Reads below this size go through recv/send, in this one buffer shared by every tunnel
#: (only ever used within one synchronous step).
SMALL = 16 * 1024
_BUF = bytearray(SMALL)
_VIEW = memoryview(_BUF)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE = getattr(os, "splice", None)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
#: Idle pipes kept for reuse: a pipe pair costs three syscalls to make and two to close.
_POOL: list[tuple[int, int]] = []
POOL_MAX = 256
_chunk = CHUNK
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_LINGER_RESET = struct.pack("ii", 1, 0)


def splice_available() -> bool:
    return _SPLICE is not None


def _new_pipe() -> tuple[int, int]:
    global _chunk
    if _POOL:
        return _POOL.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, _chunk)
    except OSError:  # above fs.pipe-max-size for an unprivileged user: keep what we have
        _chunk = 64 * 1024
    return r, w


def _put_pipe(pipe: tuple[int, int], clean: bool) -> None:
    if clean and len(_POOL) < POOL_MAX:
        _POOL.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


def reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN: the peer must see the failure, not a clean end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass


class Idle:
    """One idle timer for a connection. The hot path only counts activity (`touch`, no
    clock read, no deadline moved); the listener's sweep, every DRAIN_CHECK, cancels
    `scope` once the count has not moved for `timeout`."""

    __slots__ = ("scope", "timeout", "n", "seen", "since")

    def __init__(self, scope: trio.CancelScope, timeout: float) -> None:
        self.scope = scope
        self.timeout = timeout
        self.n = 0
        self.seen = -1
        self.since = 0.0

    def touch(self) -> None:
        self.n += 1

    def sweep(self, now: float) -> None:
        if self.n != self.seen:
            self.seen = self.n
            self.since = now
        elif now - self.since >= self.timeout:
            self.scope.cancel()


class _Way:
    """One direction: src -> dst."""

    __slots__ = ("src", "dst", "count", "pending", "pipe", "in_pipe", "eof", "done", "splice")

    def __init__(self, src: socket.socket, dst: socket.socket, count: Callable[[int], None], splice: bool) -> None:
        self.src = src
        self.dst = dst
        self.count = count
        self.pending: memoryview | None = None  # bytes read, not yet taken by dst
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0
        self.eof = False  # src ended
        self.done = False  # ... and dst was told (shutdown)
        self.splice = splice

    @property
    def blocked(self) -> bool:
        return self.pending is not None or self.in_pipe > 0

    def move(self) -> None:
        """Move what can be moved now. OSError (a reset) propagates."""
        if self.done:
            return
        if not self._flush():
            return
        src, dst = self.src, self.dst
        for _ in range(BATCH):
            if self.eof:
                break
            if self.pipe is None:
                try:
                    n = src.recv_into(_BUF)
                except BlockingIOError:
                    return
                if n == 0:
                    self.eof = True
                    break
                try:
                    sent = dst.send(_VIEW[:n])
                except BlockingIOError:
                    sent = 0
                self.count(n)
                if sent < n:
                    self.pending = memoryview(bytes(_VIEW[sent:n]))
                    return
                if n == SMALL and self.splice:
                    self.pipe = _new_pipe()
            else:
                try:
                    n = _SPLICE(src.fileno(), self.pipe[1], _chunk, None, None, _FLAGS)  # type: ignore[misc]
                except BlockingIOError:
                    return
                if n == 0:
                    self.eof = True
                    break
                self.in_pipe = n
                self.count(n)
                if not self._flush():
                    return
        if self.eof and not self.blocked:
            self.done = True
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    raise

    def _flush(self) -> bool:
        """Send what is held back; True once nothing is."""
        if self.pending is not None:
            try:
                n = self.dst.send(self.pending)
            except BlockingIOError:
                return False
            rest = self.pending[n:]
            self.pending = rest if rest else None
            if self.pending is not None:
                return False
        if self.in_pipe:
            assert self.pipe is not None
            dfd = self.dst.fileno()
            while self.in_pipe:
                try:
                    self.in_pipe -= _SPLICE(self.pipe[0], dfd, self.in_pipe, None, None, _FLAGS)  # type: ignore[misc]
                except BlockingIOError:
                    return False
        return True

    def release(self) -> None:
        if self.pipe is not None:
            _put_pipe(self.pipe, self.in_pipe == 0)
            self.pipe = None


class Tunnel:
    """Two connected sockets relayed both ways by a Relay. `done` is set when both
    directions ended (`broken`: by a reset, after which both sides were reset)."""

    __slots__ = ("a", "b", "ab", "ba", "idle", "done", "broken", "finished", "_masks", "_relay")

    def __init__(self, a: socket.socket, b: socket.socket, idle: Idle, count_ab: Callable[[int], None],
                 count_ba: Callable[[int], None], *, use_splice: bool = True) -> None:
        splice = use_splice and _SPLICE is not None
        self.a, self.b = a, b
        self.ab = _Way(a, b, count_ab, splice)
        self.ba = _Way(b, a, count_ba, splice)
        self.idle = idle
        self.done = trio.Event()
        self.broken = False
        self.finished = False
        self._masks = [-1, -1]
        self._relay: Relay | None = None

    def _want(self) -> tuple[int, int]:
        ab, ba = self.ab, self.ba
        ma = (0 if ab.eof or ab.blocked else _IN) | (_OUT if ba.blocked else 0)
        mb = (0 if ba.eof or ba.blocked else _IN) | (_OUT if ab.blocked else 0)
        return ma, mb

    def step(self, events: int = 0) -> None:
        """Run both directions as far as they go; update what the relay watches."""
        self.idle.touch()
        try:
            self.ab.move()
            self.ba.move()
            if self.ab.done and self.ba.done:
                self._end(broken=False)
                return
            if events & select.EPOLLERR:
                # An error with nothing to read or write that would surface it.
                err = self.a.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or \
                    self.b.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
        except OSError:
            self._end(broken=True)
            return
        relay = self._relay
        assert relay is not None
        ma, mb = self._want()
        masks = self._masks
        if ma != masks[0]:
            relay.watch(self.a, ma, masks[0] < 0)
            masks[0] = ma
        if mb != masks[1]:
            relay.watch(self.b, mb, masks[1] < 0)
            masks[1] = mb

    def abort(self) -> None:
        """The owner was cancelled (drain, idle, agent stop): both sides hear a reset."""
        if not self.finished:
            self._end(broken=True)

    def _end(self, broken: bool) -> None:
        self.finished = True
        self.broken = broken
        if self._relay is not None:
            self._relay.forget(self.a, self._masks[0] >= 0)
            self._relay.forget(self.b, self._masks[1] >= 0)
        self.ab.release()
        self.ba.release()
        if broken:
            reset(self.a)
            reset(self.b)
        self.done.set()


class Relay:
    """The tunnels of one listener, served by one task."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._tunnels: dict[int, Tunnel] = {}
        self._closed = False

    def add(self, t: Tunnel) -> None:
        """Start relaying (moves whatever is already waiting at once)."""
        t._relay = self
        self._tunnels[t.a.fileno()] = t
        self._tunnels[t.b.fileno()] = t
        t.step()

    def watch(self, sock: socket.socket, mask: int, new: bool) -> None:
        # With mask 0 a socket stays in the set, for errors and hang-ups only.
        if new:
            self._ep.register(sock, mask)
        else:
            self._ep.modify(sock, mask)

    def forget(self, sock: socket.socket, registered: bool) -> None:
        fd = sock.fileno()
        self._tunnels.pop(fd, None)
        if registered and not self._closed:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    async def run(self) -> None:
        ep = self._ep
        tunnels = self._tunnels
        hup = select.EPOLLHUP
        try:
            while True:
                await trio.lowlevel.wait_readable(ep)
                for fd, ev in ep.poll(0, 256):
                    t = tunnels.get(fd)
                    if t is None or t.finished:
                        continue
                    t.step(ev)
                    if ev & hup and not t.finished and fd in tunnels:
                        # Both ways shut on that socket and nothing more to move: stop
                        # hearing about it (level-triggered, it would be reported on).
                        sock = t.a if t.a.fileno() == fd else t.b
                        i = 0 if sock is t.a else 1
                        if t._masks[i] == 0:
                            ep.unregister(fd)
                            t._masks[i] = -1
        finally:
            self._closed = True
            for t in list(tunnels.values()):
                t.abort()
            trio.lowlevel.notify_closing(ep)
            ep.close()
