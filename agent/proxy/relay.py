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
from typing import Any, Callable

import trio

from ..turns import FRAMES_PER_UNIT, Turns

#: Bytes moved per splice. Pipes are grown to this so one call moves a whole chunk.
CHUNK = 256 * 1024
#: Chunks (or small reads) moved per direction per event, so one busy tunnel cannot hold
#: the loop (the epoll set is level-triggered: what is left is reported again).
BATCH = 16
#: Readiness events a relay handles per scheduler pass at most, and per unit of the
#: agent's pass budget (agent/turns.py) when it has one: a small tunnel step (a read and a
#: write) is ~10-20 us, a unit ~30-60 us of work.
MAX_EVENTS = 256
EVENTS_PER_UNIT = 2
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
_LINGER_RESET = struct.pack("ii", 1, 0)
#: What an event says about a socket: bytes (or an end, or an error) to read; room (or an
#: error) to write. Errors and hang-ups set both, so the next call surfaces them.
_READ_EDGE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE_EDGE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


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
    `scope` (a trio.CancelScope, or anything with `cancel()`) once the count has not moved
    for `timeout`."""

    __slots__ = ("scope", "timeout", "n", "seen", "since")

    def __init__(self, scope: Any, timeout: float) -> None:
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

    __slots__ = ("src", "dst", "count", "pending", "pipe", "in_pipe", "eof", "done", "splice", "can_read",
                 "can_write")

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
        # Edge-triggered: whether src may have bytes / dst may have room, until a call
        # says EAGAIN; the next edge on that socket sets it again. No syscall is spent on
        # a side known to be dry or full.
        self.can_read = True
        self.can_write = True

    @property
    def blocked(self) -> bool:
        return self.pending is not None or self.in_pipe > 0

    def move(self) -> bool:
        """Move what can be moved now; True if it stopped with more to move (its batch
        used up: no new edge will say so). OSError (a reset) propagates."""
        if self.done or not self._flush():
            return False
        src, dst = self.src, self.dst
        for _ in range(BATCH):
            if self.eof:
                break
            if not self.can_read:
                return False
            if self.pipe is None:
                try:
                    n = src.recv_into(_BUF)
                except BlockingIOError:
                    self.can_read = False
                    return False
                if n == 0:
                    self.eof = True
                    break
                try:
                    sent = dst.send(_VIEW[:n])
                except BlockingIOError:
                    sent = 0
                    self.can_write = False
                self.count(n)
                if sent < n:
                    self.pending = memoryview(bytes(_VIEW[sent:n]))
                    return False
                if n == SMALL and self.splice:
                    try:
                        self.pipe = _new_pipe()
                    except OSError:  # out of fds (the reserve is the agent's): keep copying
                        self.splice = False
            else:
                try:
                    n = _SPLICE(src.fileno(), self.pipe[1], _chunk, None, None, _FLAGS)  # type: ignore[misc]
                except BlockingIOError:
                    self.can_read = False
                    return False
                if n == 0:
                    self.eof = True
                    break
                self.in_pipe = n
                self.count(n)
                if not self._flush():
                    return False
        else:
            return True
        if self.eof and not self.blocked:
            self.done = True
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    raise
        return False

    def _flush(self) -> bool:
        """Send what is held back; True once nothing is."""
        if self.pending is None and not self.in_pipe:
            return True
        if not self.can_write:
            return False
        if self.pending is not None:
            try:
                n = self.dst.send(self.pending)
            except BlockingIOError:
                self.can_write = False
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
                    self.can_write = False
                    return False
        return True

    def release(self) -> None:
        if self.pipe is not None:
            _put_pipe(self.pipe, self.in_pipe == 0)
            self.pipe = None


class Tunnel:
    """Two connected sockets relayed both ways by a Relay. `done` is set when both
    directions ended (`broken`: by a reset, after which both sides were reset)."""

    __slots__ = ("a", "b", "ab", "ba", "idle", "done", "broken", "finished", "_relay", "on_end")

    def __init__(self, a: socket.socket, b: socket.socket, idle: Idle, count_ab: Callable[[int], None],
                 count_ba: Callable[[int], None], *, use_splice: bool = True) -> None:
        splice = use_splice and _SPLICE is not None
        self.a, self.b = a, b
        self.ab = _Way(a, b, count_ab, splice)
        self.ba = _Way(b, a, count_ba, splice)
        self.idle = idle
        #: Called once the tunnel ended, after `done` is set (a tunnel with no task awaiting
        #: `done` cleans up here).
        self.on_end: Callable[[], None] | None = None
        self.done = trio.Event()
        self.broken = False
        self.finished = False
        self._relay: Relay | None = None

    def step(self, fd: int = -1, events: int = 0) -> bool:
        """Note what an event on `fd` says, run both directions as far as they go; True
        if one has more to move now."""
        self.idle.touch()
        if fd >= 0:
            src, dst = (self.ab, self.ba) if fd == self.a.fileno() else (self.ba, self.ab)
            if events & _READ_EDGE:
                src.can_read = True
            if events & _WRITE_EDGE:
                dst.can_write = True
        try:
            more = self.ab.move()
            more = self.ba.move() or more
            if self.ab.done and self.ba.done:
                self._end(broken=False)
                return False
            if events & select.EPOLLERR:
                # An error with nothing to read or write that would surface it.
                err = self.a.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or \
                    self.b.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
        except OSError:
            self._end(broken=True)
            return False
        return more

    def abort(self) -> None:
        """The owner was cancelled (drain, idle, agent stop): both sides hear a reset."""
        if not self.finished:
            self._end(broken=True)

    def _end(self, broken: bool) -> None:
        self.finished = True
        self.broken = broken
        if self._relay is not None:
            self._relay.forget(self)
        self.ab.release()
        self.ba.release()
        if broken:
            reset(self.a)
            reset(self.b)
        self.done.set()
        if self.on_end is not None:
            self.on_end()


class Relay:
    """The tunnels of one listener, served by one task.

    Each socket is registered once, edge-triggered for both readable and writable, and
    never modified: a direction runs until its source says EAGAIN (the next bytes bring
    a new edge), its destination says EAGAIN (space freed brings one), or its batch is
    used up (then the tunnel is queued to run again after the others had their turn).
    The kernel drops a socket from the set when it is closed; nothing is unregistered.

    With `turns` (the agent's, agent/turns.py) the relay takes a turn under `key` each time
    it goes to work, and moves at most EVENTS_PER_UNIT events per unit left in the pass: a
    local user driving many tunnels flat out shares the pass with every other caller
    instead of running up to 256 tunnel steps in it (bench/bystander.py, proxy_tcp).
    """

    _MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET

    def __init__(self, turns: Turns | None = None, key: str = "relay") -> None:
        self._ep = select.epoll()
        self._tunnels: dict[int, Tunnel] = {}
        self._again: list[Tunnel] = []
        self._turns = turns
        self._key = key

    def add(self, t: Tunnel) -> None:
        """Start relaying (moves whatever is already waiting at once)."""
        t._relay = self
        for sock in (t.a, t.b):
            self._tunnels[sock.fileno()] = t
            self._ep.register(sock, self._MASK)
        if t.step():
            self._again.append(t)

    def forget(self, t: Tunnel) -> None:
        """The tunnel ended: its sockets' events, until their owner closes them (the set
        then drops them), are for nobody; edge-triggered, they are few."""
        for sock in (t.a, t.b):
            self._tunnels.pop(sock.fileno(), None)

    async def run(self) -> None:
        ep = self._ep
        tunnels = self._tunnels
        turns, key = self._turns, self._key
        try:
            while True:
                if self._again:
                    await trio.lowlevel.checkpoint()  # the others' turn first
                else:
                    await trio.lowlevel.wait_readable(ep)
                most = MAX_EVENTS
                if turns is not None:
                    if not turns.free(key):
                        await turns.wait(key)
                    most = min(MAX_EVENTS, EVENTS_PER_UNIT * turns.room())
                again, self._again = self._again, []
                for t in again:
                    if not t.finished and t.step():
                        self._again.append(t)
                events = ep.poll(0, most)
                for fd, ev in events:
                    t = tunnels.get(fd)
                    if t is not None and not t.finished and t.step(fd, ev):
                        self._again.append(t)
                if turns is not None:
                    turns.spend(FRAMES_PER_UNIT * (len(again) + len(events)) // EVENTS_PER_UNIT)
        finally:
            for t in list(tunnels.values()):
                t.abort()
            trio.lowlevel.notify_closing(ep)
            ep.close()
