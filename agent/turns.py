"""Turns: a bound on the work the connections do in one scheduler pass, shared round robin
by the peers, so one peer's many connections cannot make everyone else wait behind them.

Why: trio runs, in one pass, every task made runnable since it last polled for I/O. Each
connection already bounds its own turn (ipc_server: MAX_TURN_FRAMES), but a local user
holding a thousand connections can make them all readable at once (close them together, or
write one request on each): a thousand turns in one pass, tens of ms, and a bystander's
resolve woken in the same pass waits for all of them (issue 10, the connection flood).

How: a pass grants BUDGET units (a wakeup costs one, answered frames one per FRAMES_PER_UNIT),
half as many after a pass whose work took over SLOW_PASS in measured time.
The lot (agent/lot.py), where idle connections wait, asks `free` for each connection it finds
readable: one woken when the pass has units left, and none of its peer's is queued, goes on at
once: the common case costs a few attribute reads. Past the budget it queues under its peer
(uid:pid on the Unix socket, the address on TCP) and parks; a releaser lets queued connections go at
up to BUDGET per pass, one per uid in turn and within a uid one per process in turn, so a
bystander with one queued connection goes within a pass or two however many the flooding
peer has queued, and a user cannot buy more turns by forking more processes (beyond the
lot's HOT slots: a light process's wakeup there goes on past a spent budget, `go`). A pass is
counted by a trio instrument hook that runs before each I/O poll.
"""

from __future__ import annotations

import time
from collections import deque

import trio

#: Units per scheduler pass: 16 requests' wakeups, or 4 connections' ends, or ~256 answered
#: frames: about a millisecond here. A wakeup for a request costs one unit (~30-60 us of
#: work); one for a hang-up costs END_COST (the task winds down, ~100 us, more with the
#: young collections a flood of ends brings), as the lot sees it (EPOLLRDHUP). At 8 units
#: of one each, 16 clients resolving at once lost a quarter of their rate to queueing; at
#: 32, a watch flood's 40 connections registering watches ran 32 turns a pass (~3 ms).
#: END_COST was 2 (8 ends a pass): with a caller's request answered in the pass after it
#: arrives (agent/lot.py, light peers), the pass's length is its wait, and at 4 the
#: connection flood's bystander p99 went 3.7 -> 2.3 ms (pooled over three runs, with
#: ACCEPT_BATCH 8 -> 4; docs/RELIABILITY.md).
BUDGET = 16
END_COST = 4
FRAMES_PER_UNIT = 16
#: A pass whose work (I/O poll to I/O poll) took longer than this, in measured time, halves
#: the next pass's budget: counted units are a guess at the cost, and in a connection flood
#: a pass of 16 units ran 1.5-2.5 ms of CPU here (hang-ups, a young-generation collection,
#: a refused connection), more under CPU contention, while a bystander waits a pass or two.
#: Measured time also counts what no unit does (collections, other tasks' steps).
SLOW_PASS = 0.0015


class Turns(trio.abc.Instrument):
    def __init__(self, budget: int = BUDGET) -> None:
        self.budget = budget
        #: This pass's budget: `budget`, or half of it after a slow pass (SLOW_PASS).
        self.limit = budget
        self.passes = 0  # bumped before each I/O poll: one per scheduler pass
        self._seen = -1
        self.used = 0
        self._last_poll = 0.0
        self._polled_busy = False
        #: Passes that came after a slow one (a counter for tests and /metrics).
        self.slow_passes = 0
        #: Queued tasks by peer key, each with the units it will cost when let go.
        self._queues: dict[str, deque[tuple[trio.lowlevel.Task, int]]] = {}
        #: Two-level turn order: groups (the uid of "uid:pid") with someone queued, and in
        #: each group its peers with someone queued. A user who forks a thousand processes
        #: gets one group's share against another user, not a thousand.
        self._ring: deque[str] = deque()
        self._groups: dict[str, deque[str]] = {}
        self._idle: trio.lowlevel.Task | None = None  # the releaser, parked with nothing queued
        #: Connections that had to queue (a flood is on): a counter for /metrics.
        self.queued_total = 0

    @property
    def queued(self) -> int:
        """Tasks waiting for their turn now."""
        return sum(len(q) for q in self._queues.values())

    @property
    def calm(self) -> bool:
        """Nobody is queued: no flood is on."""
        return not self._queues

    # -- trio instrument hook
    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1
        # One hook and one clock read a pass (the sequential resolve runs a few passes per
        # call; an after_io_wait hook too is one more Python call each): from one poll to
        # the next is the pass's work when the poll between did not wait (timeout 0).
        now = time.perf_counter()
        if self._polled_busy and now - self._last_poll > SLOW_PASS:
            self.limit = self.budget // 2
            self.slow_passes += 1
        else:
            self.limit = self.budget
        self._last_poll, self._polled_busy = now, timeout == 0

    # -- what a connection calls
    def free(self, key: str, cost: int = 1) -> bool:
        """A woken connection of peer `key` may go on in this pass (and takes `cost` units)
        if True: the pass has units left and none of this peer's connections is queued (a
        peer's wakeups keep their order; another peer's queue does not hold this one back)."""
        if self._seen != self.passes:
            self._seen = self.passes
            self.used = 0
        if self.used < self.limit and (not self._queues or key not in self._queues):
            self.used += cost
            return True
        return False

    def go(self, key: str, cost: int = 1) -> bool:
        """A light peer's wakeup (agent/lot.py, LIGHT): it goes on in this pass unless one of
        its own is queued, spent or not, and is charged to the pass. Only the
        lot's HOT connections come here, each at most once a pass: HOT units past the budget
        at most."""
        if self._queues and key in self._queues:
            return False  # its own wakeups keep their order
        if self._seen != self.passes:
            self._seen = self.passes
            self.used = 0
        self.used += cost
        return True

    def room(self) -> int:
        """Units left in this pass (at least one: whoever asks goes on a little)."""
        if self._seen != self.passes:
            self._seen = self.passes
            self.used = 0
        return max(1, self.limit - self.used)

    def spend(self, frames: int) -> None:
        """Charge a turn's answered frames to this pass."""
        if self._seen != self.passes:
            self._seen = self.passes
            self.used = 0
        self.used += frames // FRAMES_PER_UNIT

    async def wait(self, key: str, cost: int = 1) -> None:
        """Queue under `key` until the releaser lets this task go (round robin by key),
        charged `cost` units then."""
        task = trio.lowlevel.current_task()
        self.park(task, key, cost)

        def abort(_: object) -> trio.lowlevel.Abort:
            self.discard(task, key)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def park(self, task: trio.lowlevel.Task, key: str, cost: int = 1) -> None:
        """Queue `task`, already parked (wait_task_rescheduled), under `key`: the releaser
        reschedules it in its turn. Its abort must call `discard`."""
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
            group = _group(key)
            peers = self._groups.get(group)
            if peers is None:
                peers = self._groups[group] = deque()
                self._ring.append(group)
            peers.append(key)
        q.append((task, cost))
        self.queued_total += 1
        if self._idle is not None:
            trio.lowlevel.reschedule(self._idle)
            self._idle = None

    def discard(self, task: trio.lowlevel.Task, key: str) -> None:
        """Take a queued task out (it was cancelled)."""
        q = self._queues.get(key)
        if q is None:
            return
        for item in q:
            if item[0] is task:
                q.remove(item)
                break
        if not q:
            del self._queues[key]
            group = _group(key)
            peers = self._groups[group]
            peers.remove(key)
            if not peers:
                del self._groups[group]
                self._ring.remove(group)

    # -- the releaser
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        trio.lowlevel.add_instrument(self)
        try:
            task_status.started()
            while True:
                if not self._queues:
                    self._idle = trio.lowlevel.current_task()

                    def abort(_: object) -> trio.lowlevel.Abort:
                        self._idle = None
                        return trio.lowlevel.Abort.SUCCEEDED

                    await trio.lowlevel.wait_task_rescheduled(abort)
                    continue
                self._release()
                await trio.lowlevel.checkpoint()
        finally:
            trio.lowlevel.remove_instrument(self)

    def _release(self) -> None:
        if self._seen != self.passes:
            self._seen = self.passes
            self.used = 0
        room = max(1, self.limit - self.used)  # at least one unit: the queue always moves
        queues, ring, groups = self._queues, self._ring, self._groups
        while room and ring:
            group = ring.popleft()
            peers = groups[group]
            key = peers.popleft()
            q = queues[key]
            task, cost = q.popleft()
            trio.lowlevel.reschedule(task)
            room = max(0, room - cost)
            self.used += cost
            if q:
                peers.append(key)
            else:
                del queues[key]
            if peers:
                ring.append(group)
            else:
                del groups[group]


def _group(key: str) -> str:
    """The uid of a "uid:pid" key. TCP peers are one group, whatever their address: any
    local user can connect from as many of 127.0.0.0/8's addresses as it likes."""
    uid, sep, _ = key.partition(":")
    if sep and uid.isdigit():
        return uid
    return "unix" if key == "unix" or key.startswith("unix/") else "tcp"
