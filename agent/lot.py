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
While no peer is queued in `Turns` (no flood on), up to HOT (8) connections wait in trio's own
epoll instead, and ask `Turns.free` when woken: a sequential caller's request then costs one
wakeup, not the pump's step and its own (5-15% of its rate, measured). While a flood is on,
only light peers' connections (a process with at most LIGHT open) take those slots, and
go on when woken unless one of their own is queued: a caller's request keeps its one
wakeup while another process floods (a hang-up does not: it queues at END_COST). Heavy
peers' connections take slots only while calm, and at most half of them, so a process
holding many idle connections cannot keep them all. Either way at most HOT wake in one
pass beyond the budget; every other wait, while anyone is queued, is in the lot. A send
the kernel would not take whole waits here too (for EPOLLOUT),
so connections whose peers stop reading, closed together, are let go the same way. A
socket closed while registered leaves the epoll set by itself.
"""

from __future__ import annotations

import select
import socket

import trio

from .turns import END_COST, Turns

#: Ready sockets taken from the kernel per pass: beyond it they stay ready for the next.
MAX_EVENTS = 512
#: Connections that may wait in trio's own epoll (any while nobody is queued, light peers'
#: during a flood too): what one pass can wake beyond the budget. A hang-up woken there while
#: calm is charged one unit, not END_COST (trio does not say why a socket is readable), so
#: HOT is half the budget; one woken during a flood is asked (POLLRDHUP) and queues at
#: END_COST. (The lot's releases run in the pass after the one they are charged to, and hot
#: wakeups in their own, so a pass can still run the lot's BUDGET / END_COST ends and 8 hot
#: ones at a flood's start.)
HOT = 8
#: A peer (a process on the Unix socket; TCP's peers count together) with at most this
#: many connections open is light: its connections may take a HOT slot while a flood is on too,
#: and go on when woken unless one of its own is queued. A caller's request then costs one
#: wakeup during a flood as well, not the pump's pass and its own (1-3 passes of ~1 ms in the
#: connection flood). A flooding process holds more. One user's light processes hold at
#: most half the slots (TCP's peers are one user here), so another user's caller always
#: finds one; two users together can fill them and, idle, hold them for as long as they
#: like: that costs the others the fast path (their requests past a spent budget go outside
#: the round robin, HOT a pass at most), no more.
LIGHT = 4
_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT | select.EPOLLRDHUP
#: The peer hung up (or the socket failed): the connection will end, which costs more.
_GONE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
#: What wakes a reader, and a writer (a hang-up or an error wakes both: a writer whose peer
#: is gone fails its next send and ends).
_READY_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_READY_OUT = select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_Abort = trio.lowlevel.Abort


class Lot:
    def __init__(self, turns: Turns, hot: int = HOT) -> None:
        self.turns = turns
        self.hot = hot
        self._hot = 0  # connections waiting in trio's epoll now
        #: Of them, heavy peers' (taken while calm): at most half the slots, so a process
        #: holding many idle connections cannot keep every slot from the light ones.
        self._hot_heavy = 0
        #: Light peers' slots by uid: one user holds at most half, so another user's
        #: caller always finds one however many light processes the first keeps idle.
        self._hot_by_uid: dict[str, int] = {}
        self.hot_per_uid = max(1, hot // 2)
        #: Open connections by crowd (listeners.Peer.crowd: the process on the Unix socket,
        #: all of TCP together).
        self._open: dict[str, int] = {}
        self._ep = select.epoll()
        self._rdhup = select.poll()  # asked of one socket at a time (_hung_up)
        #: fd -> (task, peer key) of the connections waiting for their socket: readers, and
        #: writers (a send the kernel would not take whole).
        self._readers: dict[int, tuple[trio.lowlevel.Task, str]] = {}
        self._writers: dict[int, tuple[trio.lowlevel.Task, str]] = {}

    @property
    def parked(self) -> int:
        return len(self._readers) + len(self._writers)

    def close(self) -> None:
        self._ep.close()

    def _arm(self, fd: int) -> None:
        """Set the fd's interest to its waiters' (none: disarmed)."""
        mask = (_IN if fd in self._readers else 0) | (_OUT if fd in self._writers else 0)
        if mask:
            mask |= select.EPOLLONESHOT
        try:
            self._ep.modify(fd, mask)
        except FileNotFoundError:  # first wait of this socket (a closed one left the set)
            if mask:
                self._ep.register(fd, mask)
        except OSError:  # closed meanwhile: nothing to arm
            pass

    async def wait_readable(self, sock: socket.socket, key: str, crowd: str | None = None) -> None:
        """Park until `sock` is readable (or `wake` is called for it) and this peer's turn
        has come. `crowd`: whose open connections (`opened`) make the peer light or not;
        the peer key itself by default."""
        turns = self.turns
        if self._hot < self.hot:
            crowd = key if crowd is None else crowd
            uid = crowd.partition(":")[0]  # TCP's one crowd is one user here too
            held = self._hot_by_uid.get(uid, 0)
            light = self._open.get(crowd, 0) <= LIGHT and held < self.hot_per_uid
            if light or (turns.calm and self._hot_heavy < self.hot // 2):
                self._hot += 1
                if light:
                    self._hot_by_uid[uid] = held + 1
                else:
                    self._hot_heavy += 1
                try:
                    await trio.lowlevel.wait_readable(sock)
                finally:
                    self._hot -= 1
                    if light:
                        _less(self._hot_by_uid, uid)
                    else:
                        self._hot_heavy -= 1
                if not turns.calm and self._hung_up(sock):
                    # A hang-up woken here during a flood ends in the lot's turn, charged
                    # END_COST: going on at once (one unit), light processes hanging up
                    # while another floods ran 8 ends a pass past the lot's, every pass.
                    await turns.wait(key, END_COST)
                elif not (turns.go(key) if light else turns.free(key)):
                    await turns.wait(key)
                return
        await self._wait(self._readers, sock.fileno(), key)

    def _hung_up(self, sock: socket.socket) -> bool:
        """Whether the peer has shut its side (EPOLLRDHUP's test, asked of one socket: a
        request sent just before the hang-up still counts as one)."""
        try:
            fd = sock.fileno()
            poll = self._rdhup
            poll.register(fd, select.POLLRDHUP)
            try:
                return bool(poll.poll(0))
            finally:
                poll.unregister(fd)
        except OSError:
            return True

    def opened(self, crowd: str) -> None:
        """A connection of `crowd` (listeners.Peer.crowd) was accepted: what makes a peer
        light or not."""
        self._open[crowd] = self._open.get(crowd, 0) + 1

    def connections(self, crowd: str) -> int:
        """Open connections of `crowd` (a figure for tests)."""
        return self._open.get(crowd, 0)

    def closed(self, crowd: str) -> None:
        _less(self._open, crowd)

    @property
    def hot_waiting(self) -> int:
        """Connections waiting in trio's epoll (the fast path: any while calm, light peers'
        during a flood)."""
        return self._hot

    async def wait_writable(self, sock: socket.socket, key: str) -> None:
        """Park until `sock` is writable (or `wake` is called for it) and this peer's turn
        has come."""
        await self._wait(self._writers, sock.fileno(), key)

    async def _wait(self, waiting: dict[int, tuple[trio.lowlevel.Task, str]], fd: int, key: str) -> None:
        task = trio.lowlevel.current_task()
        entry = (task, key)
        waiting[fd] = entry
        self._arm(fd)

        def abort(_: object) -> trio.lowlevel.Abort:
            if waiting.get(fd) is entry:
                del waiting[fd]
                self._arm(fd)  # disarmed, or armed for the other waiter only
            else:
                self.turns.discard(task, key)
            return _Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def wake(self, sock: socket.socket) -> None:
        """Let the connection's tasks parked on `sock` go now (a drain starting)."""
        try:
            fd = sock.fileno()
        except OSError:
            return
        for waiting in (self._readers, self._writers):
            entry = waiting.pop(fd, None)
            if entry is not None:
                trio.lowlevel.reschedule(entry[0])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        wait_readable = trio.lowlevel.wait_readable
        reschedule = trio.lowlevel.reschedule
        poll = self._ep.poll
        readers, writers = self._readers, self._writers
        both = ((readers, _READY_IN), (writers, _READY_OUT))
        turns = self.turns
        free, park = turns.free, turns.park
        task_status.started()
        try:
            while True:
                await wait_readable(self._ep)
                for fd, ev in poll(0, MAX_EVENTS):
                    left = False
                    for waiting, mask in both:
                        if not ev & mask:
                            left = left or fd in waiting
                            continue
                        entry = waiting.pop(fd, None)
                        if entry is None:  # cancelled meanwhile, or woken by `wake`
                            continue
                        task, key = entry
                        cost = END_COST if ev & _GONE else 1
                        if free(key, cost):
                            reschedule(task)
                        else:
                            park(task, key, cost)
                    if left:  # one-shot: the event disarmed the other waiter's interest too
                        self._arm(fd)
        finally:
            self.close()


def _less(counts: dict[str, int], key: str) -> None:
    """One fewer under `key`; a count that reaches none leaves the dict (so it holds only
    the peers with something open, however many come and go)."""
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)
