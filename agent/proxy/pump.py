"""Moving bytes between two sockets: recv/send while the reads are small, then splice(2)
through a pipe where the kernel has it (bulk bytes never enter Python). One direction per
call; the caller runs two, one each way.

Half-close is passed on: end of stream from one side becomes shutdown(SHUT_WR) towards the
other, and the opposite direction keeps flowing until it ends too.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import Callable

import trio

#: Bytes moved per splice/recv. Pipes are grown to this so one call moves a whole chunk.
CHUNK = 256 * 1024
#: Chunks moved in a row before the pump yields to other tasks, so one busy connection
#: cannot hold the loop.
BATCH = 16
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE = getattr(os, "splice", None)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
#: Idle pipes kept for reuse: a pipe pair costs three syscalls to make and two to close,
#: which shows on connection-per-request loads.
_POOL: list[tuple[int, int]] = []
#: Reads below this size go through recv/send (see _copy), in this one buffer shared by
#: every connection (only ever used between two awaits).
SMALL = 16 * 1024
_BUF = bytearray(SMALL)
_VIEW = memoryview(_BUF)
POOL_MAX = 256
_chunk = CHUNK


def splice_available() -> bool:
    return _SPLICE is not None


def _new_pipe() -> tuple[int, int]:
    global _chunk
    if _POOL:
        return _POOL.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, CHUNK)
    except OSError:  # above fs.pipe-max-size for an unprivileged user: keep what we have
        _chunk = min(_chunk, 64 * 1024)
    return r, w


def _put_pipe(pipe: tuple[int, int], clean: bool) -> None:
    if clean and len(_POOL) < POOL_MAX:
        _POOL.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


class Idle:
    """One idle timer for both directions of a connection. The hot path only counts
    activity (`touch`, no clock read, no deadline moved: that cost ~5 µs a wait); the
    listener's sweep, every DRAIN_CHECK, cancels `scope` once the count has not moved for
    `timeout`."""

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


async def pump(src: socket.socket, dst: socket.socket, idle: Idle,
               count: Callable[[int], None], *, use_splice: bool = True) -> None:
    """Copy src -> dst until src's end of stream, then shut dst's write side.
    OSError (a reset) propagates; the caller closes both sockets."""
    await _copy(src, dst, idle, count, use_splice and _SPLICE is not None)
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise


async def _splice(src: socket.socket, dst: socket.socket, idle: Idle,
                  count: Callable[[int], None]) -> None:
    splice = _SPLICE
    assert splice is not None
    sfd, dfd = src.fileno(), dst.fileno()
    pipe = _new_pipe()
    r, w = pipe
    clean = True
    wait_readable, wait_writable = trio.lowlevel.wait_readable, trio.lowlevel.wait_writable
    try:
        batch = 0
        while True:
            try:
                n = splice(sfd, w, _chunk, None, None, _FLAGS)
            except BlockingIOError:
                batch = 0
                idle.touch()
                await wait_readable(src)
                continue
            if n == 0:
                return
            clean = False
            left = n
            while left:
                try:
                    left -= splice(r, dfd, left, None, None, _FLAGS)
                except BlockingIOError:
                    idle.touch()
                    await wait_writable(dst)
            clean = True
            count(n)
            batch += 1
            if batch >= BATCH:
                batch = 0
                idle.touch()
                await trio.lowlevel.checkpoint()
    finally:
        _put_pipe(pipe, clean)


async def _copy(src: socket.socket, dst: socket.socket, idle: Idle, count: Callable[[int], None],
                then_splice: bool) -> None:
    """recv/send through one shared buffer while reads are small; the first read that
    fills it moves the rest of the stream to splice (when `then_splice`). Small messages
    (a request, an answer) cost a syscall less each way than through a pipe and need no
    pipe; bulk streams get the zero-copy path after their first SMALL bytes."""
    buf = _BUF
    wait_readable, wait_writable = trio.lowlevel.wait_readable, trio.lowlevel.wait_writable
    batch = 0
    while True:
        try:
            n = src.recv_into(buf)
        except BlockingIOError:
            batch = 0
            idle.touch()
            await wait_readable(src)
            continue
        if n == 0:
            return
        try:
            sent = dst.send(_VIEW[:n])
        except BlockingIOError:
            sent = 0
        if sent < n:
            # The shared buffer is not ours across a wait: keep the rest aside.
            rest = memoryview(bytes(_VIEW[sent:n]))
            while rest:
                idle.touch()
                await wait_writable(dst)
                try:
                    rest = rest[dst.send(rest):]
                except BlockingIOError:
                    pass
        count(n)
        if then_splice and n == SMALL:
            await _splice(src, dst, idle, count)
            return
        batch += 1
        if batch >= BATCH:
            batch = 0
            idle.touch()
            await trio.lowlevel.checkpoint()
