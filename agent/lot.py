"""The lot: where idle IPC connections wait for their next request, in an epoll set of the
agent's own, so that how many wake at once is ours to decide (issue 10, the connection flood).

Why: a connection parked in trio's `wait_readable` is woken by trio itself, and trio runs
every task its I/O poll made runnable in the same scheduler pass. A local user holding a
thousand connections makes them all readable at once (closing them together, or writing one
byte on each), and that pass runs a thousand task steps (tens of ms here) before a
bystander's resolve woken in it. `Turns` (agent/turns.py) bounds the work *after* a
wakeup, but each woken task still took a step to learn it had to queue.

How: a parked connection registers its socket here (one-shot, so it fires once per wait)
and sleeps without a trio I/O registration. One pump task waits on this epoll's fd as trio
sees it, and each pass drains up to MAX_EVENTS ready sockets: a connection whose peer has
turns left this pass (`Turns.free`) is rescheduled at once, the rest are queued under their
peer in `Turns` (a deque append, not a task step) and let go round robin, a budget per pass.
The common case, one caller's request, costs the pump's step: one wakeup more per request
than trio's own wait. A socket closed while registered leaves the epoll set by itself.
"""

from __future__ import annotations

import select
import socket

import trio

from .turns import Turns

#: Ready sockets taken from the kernel per pass: beyond it they stay ready for the next.
MAX_EVENTS = 512
_ARM = select.EPOLLIN | select.EPOLLONESHOT
_Abort = trio.lowlevel.Abort


class Lot:
    def __init__(self, turns: Turns) -> None:
        self.turns = turns
        self._ep = select.epoll()
        #: fd -> (task, peer key) of the connections waiting for their socket.
        self._waiting: dict[int, tuple[trio.lowlevel.Task, str]] = {}

    @property
    def parked(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        self._ep.close()

    async def wait_readable(self, sock: socket.socket, key: str) -> None:
        """Park until `sock` is readable (or `wake` is called for it) and this peer's turn
        has come."""
        fd = sock.fileno()
        try:
            self._ep.modify(fd, _ARM)
        except FileNotFoundError:  # first wait of this socket (a closed one left the set)
            self._ep.register(fd, _ARM)
        task = trio.lowlevel.current_task()
        entry = (task, key)
        waiting = self._waiting
        waiting[fd] = entry

        def abort(_: object) -> trio.lowlevel.Abort:
            if waiting.get(fd) is entry:
                del waiting[fd]
                try:
                    self._ep.modify(fd, 0)  # disarmed: nothing may wake a task gone
                except OSError:
                    pass
            else:
                self.turns.discard(task, key)
            return _Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def wake(self, sock: socket.socket) -> None:
        """Let the connection parked on `sock` go now, as if readable (a drain starting)."""
        try:
            fd = sock.fileno()
        except OSError:
            return
        entry = self._waiting.pop(fd, None)
        if entry is not None:
            trio.lowlevel.reschedule(entry[0])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        wait_readable = trio.lowlevel.wait_readable
        reschedule = trio.lowlevel.reschedule
        poll = self._ep.poll
        waiting = self._waiting
        turns = self.turns
        free, park = turns.free, turns.park
        task_status.started()
        try:
            while True:
                await wait_readable(self._ep)
                for fd, _ in poll(0, MAX_EVENTS):
                    entry = waiting.pop(fd, None)
                    if entry is None:  # cancelled meanwhile, or woken by `wake`
                        continue
                    task, key = entry
                    if free(key):
                        reschedule(task)
                    else:
                        park(task, key)
        finally:
            self.close()
