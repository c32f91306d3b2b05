"""Light peers (agent/lot.py, LIGHT) under a hostile local user: in-process serve_listener on
an abstract Unix socket, connections made by real forked processes (each holding at most
LIGHT, so each is light) and handed back to the test over SCM_RIGHTS, so the test holds many
light processes' connections from one place. SO_PEERCRED names the process that connected,
whoever holds the socket later.
"""

from __future__ import annotations

import collections
import os
import random
import socket
import subprocess
import sys

import trio
import trio.testing
from helpers.frames import frame
from helpers.passes import serve_with_turns

from softlb import AgentConfig
from softlb_agent.lot import HOT, LIGHT
from softlb_agent.runtime import Runtime
from softlb_agent.turns import BUDGET, END_COST

#: Forks `procs` children, each (as `uid`, if not -1) connects `per` sockets to the abstract
#: address and sends them back over the inherited SOCK_SEQPACKET socket, then exits.
_HELPER = r"""
import os, socket, sys
back = socket.socket(fileno=int(sys.argv[1]))
addr = "\0" + sys.argv[2]
procs, per, uid = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
for _ in range(procs):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if uid >= 0:
                os.setgid(uid)
                os.setuid(uid)
            conns = []
            for _ in range(per):
                c = socket.socket(socket.AF_UNIX)
                c.connect(addr)
                conns.append(c)
            socket.send_fds(back, [b"x"], [c.fileno() for c in conns])
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
"""


def other_process_conns(name: str, procs: int, per: int, uid: int = -1) -> list[list[socket.socket]]:
    """`procs` lists of `per` connections to the abstract socket `name`, each list made by a
    process of its own (now exited). Blocks: the agent accepts them from its backlog later."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        subprocess.run([sys.executable, "-c", _HELPER, str(theirs.fileno()), name, str(procs), str(per), str(uid)],
                       pass_fds=[theirs.fileno()], check=True, timeout=60)
        out = []
        for _ in range(procs):
            _, fds, _, _ = socket.recv_fds(mine, 16, per)
            assert len(fds) == per
            out.append([socket.socket(fileno=fd) for fd in fds])
        return out
    finally:
        mine.close()
        theirs.close()


def abstract_listener() -> tuple[socket.socket, str]:
    name = f"softlb-test-{os.getpid()}-{random.getrandbits(32):x}"
    s = socket.socket(socket.AF_UNIX)
    s.bind("\0" + name)
    s.listen(1024)
    return s, name


class PassEnds(trio.abc.Instrument):
    """Connection tasks (listeners._run) that ended, by scheduler pass."""

    def __init__(self) -> None:
        self.passes = 0
        self.ends: collections.Counter[int] = collections.Counter()

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("_run"):
            self.ends[self.passes] += 1


async def _until(cond, what: str, *, each_pass: bool = False) -> None:
    """Wait for `cond`, looking every 5 ms, or every scheduler pass (while a flood is to
    last)."""
    with trio.fail_after(20):
        while not cond():
            await (trio.lowlevel.checkpoint() if each_pass else trio.sleep(0.005))


def test_light_connections_hanging_up_during_a_flood_end_within_the_lot_bound() -> None:
    """A hang-up woken in a hot slot is charged one unit (trio does not say why a socket is
    readable). On 546cc67 a light process's connection keeps its hot slot during a flood and
    goes past the spent budget when woken: a user's light processes hanging up while another
    of its processes floods ran the lot's 8 ends and 8 more in the same pass (16). (On
    88d74d6, 12: the hot waiters taken while calm went on within the next pass's budget at
    a unit each, the one-off a0e8dfc bounded with HOT 8.) Now a light peer's hang-up woken
    during a flood queues at END_COST."""
    heavy_n = 400
    result: dict[str, object] = {}

    async def main() -> None:
        rt = Runtime(AgentConfig(), None, random.Random(1))
        usock, name = abstract_listener()
        heavy: list[socket.socket] = []
        light: list[socket.socket] = []
        try:
            async with trio.open_nursery() as n:
                await serve_with_turns(n, rt, usock)
                lot = rt.lot
                # Two processes' four connections each: light, and first to wait, so they
                # hold every hot slot.
                for conns in other_process_conns(name, 2, LIGHT):
                    light += conns
                await _until(lambda: lot.hot_waiting == HOT, "light connections in the hot slots")
                # The flood: one process's many connections (heavy), idle in the lot.
                for i in range(heavy_n):
                    c = socket.socket(socket.AF_UNIX)
                    c.connect("\0" + name)
                    heavy.append(c)
                    if i % 8 == 7:
                        await trio.sleep(0.001)
                await _until(lambda: rt.stats.connections_open == heavy_n + len(light), "all accepted")
                await trio.testing.wait_all_tasks_blocked()
                assert lot.hot_waiting == HOT and lot.parked == heavy_n
                ends = PassEnds()
                trio.lowlevel.add_instrument(ends)
                for c in heavy:  # their ends queue: the lot lets BUDGET / END_COST go a pass
                    c.close()
                await _until(lambda: rt.turns.queued > 0, "the flood is on", each_pass=True)
                assert rt.stats.connections_open > len(light) + heavy_n // 2
                for c in light:  # the light ones hang up while it is on
                    c.close()
                await _until(lambda: rt.stats.connections_open == 0, "all ended")
                trio.lowlevel.remove_instrument(ends)
                result["max"] = max(ends.ends.values())
                result["ends"] = sorted(ends.ends.values(), reverse=True)[:5]
                n.cancel_scope.cancel()
        finally:
            usock.close()
            for c in heavy + light:
                c.close()

    trio.run(main)
    # The lot lets BUDGET / END_COST ends go a pass, and the releaser one more queued (its
    # floor of one unit); on 546cc67: 17.
    assert result["max"] <= BUDGET // END_COST + 1, result


def test_light_processes_connecting_and_hanging_up_during_a_flood_end_within_the_lot_bound() -> None:
    """The sustained form of the above, and what 546cc67 made of a0e8dfc's one-off: before
    it, the hot slots took no new connection while a flood was on, so hang-ups woken there
    past the budget came once, at a flood's start. Light processes' new connections take
    them during a flood too; a user connecting 8 light ones and hanging them up, round after
    round, while its other process's connections end, ran 16 ends in a pass each round (on
    88d74d6: at most 9)."""
    heavy_n, rounds = 900, 3
    result: dict[str, object] = {}

    async def main() -> None:
        rt = Runtime(AgentConfig(), None, random.Random(1))
        usock, name = abstract_listener()
        heavy: list[socket.socket] = []
        held: list[socket.socket] = []
        try:
            async with trio.open_nursery() as n:
                await serve_with_turns(n, rt, usock)
                lot, stats = rt.lot, rt.stats
                # Light connections take the hot slots while calm and hang up before the
                # flood, so the heavy ones wait in the lot and the slots are free.
                for conns in other_process_conns(name, 2, LIGHT):
                    held += conns
                await _until(lambda: lot.hot_waiting == HOT, "light connections in the hot slots")
                for i in range(heavy_n):
                    c = socket.socket(socket.AF_UNIX)
                    c.connect("\0" + name)
                    heavy.append(c)
                    if i % 8 == 7:
                        await trio.sleep(0.001)
                await _until(lambda: stats.connections_open == heavy_n + len(held), "all accepted")
                for c in held:
                    c.close()
                await _until(lambda: stats.connections_open == heavy_n and lot.hot_waiting == 0, "slots free")
                await trio.testing.wait_all_tasks_blocked()
                ends = PassEnds()
                trio.lowlevel.add_instrument(ends)
                for c in heavy:
                    c.close()
                await _until(lambda: rt.turns.queued > 0, "the flood is on", each_pass=True)
                for _ in range(rounds):
                    total = stats.connections_total
                    conns = [c for cs in other_process_conns(name, 2, LIGHT) for c in cs]
                    held += conns
                    await _until(lambda: stats.connections_total == total + len(conns), "accepted", each_pass=True)
                    for _ in range(4):  # their first steps: into the hot slots (546cc67)
                        await trio.lowlevel.checkpoint()
                    assert rt.turns.queued > 0, "the flood ended too soon to measure"
                    for c in conns:
                        c.close()
                    for _ in range(4):
                        await trio.lowlevel.checkpoint()
                await _until(lambda: stats.connections_open == 0, "all ended")
                trio.lowlevel.remove_instrument(ends)
                result["max"] = max(ends.ends.values())
                result["ends"] = sorted(ends.ends.values(), reverse=True)[:rounds + 2]
                n.cancel_scope.cancel()
        finally:
            usock.close()
            for c in heavy + held:
                c.close()

    trio.run(main)
    assert result["max"] <= BUDGET // END_COST + 1, result


def test_the_counts_of_open_connections_return_to_none_after_refusals_a_drain_and_a_stop() -> None:
    """What makes a peer light must not drift: a refused connection is never counted, and
    every accepted one is counted out however it ends (hang-up, the drain, a stop that
    cancels its task while parked in the lot, in a hot slot or queued), so no process id is
    left in `Lot._open` (which would also make a later process with that pid look heavy)."""
    from softlb_agent import ipc_server
    from softlb_agent.listeners import ConnectionBudget, ConnectionLimits

    cap = 6
    seen: dict[str, object] = {}

    async def main() -> None:
        rt = Runtime(AgentConfig(), None, random.Random(1))
        me = f"{os.getuid()}:{os.getpid()}"
        budget = ConnectionBudget(ConnectionLimits(max_connections_per_uid=cap), rt.stats)
        for stop in ("drain", "cancel"):
            usock, name = abstract_listener()
            draining = trio.Event()
            conns: list[socket.socket] = []
            try:
                async with trio.open_nursery() as n:
                    await serve_with_turns(n, rt)  # the turns and the lot, no listener
                    lot = rt.lot

                    async def serve(task_status: trio.TaskStatus[None]) -> None:
                        await ipc_server.serve_listener(rt, usock, draining=draining, budget=budget,
                                                        task_status=task_status)

                    await n.start(serve)
                    for _ in range(cap + 4):  # 4 refused (max_connections_per_uid)
                        c = socket.socket(socket.AF_UNIX)
                        c.connect("\0" + name)
                        conns.append(c)
                    await _until(lambda: rt.stats.connections_refused["peer_limit"] >= 4 * (1 + (stop == "cancel"))
                                 and rt.stats.connections_open == cap, "accepted and refused")
                    await trio.testing.wait_all_tasks_blocked()
                    seen[f"{stop} open"] = lot.connections(me)
                    conns[0].close()  # a hang-up
                    await _until(lambda: lot.connections(me) == cap - 1, "counted out")
                    # One waiting for its turn (its own peer queued: a half frame, then more
                    # than a turn's worth), the rest parked in the lot or a hot slot.
                    conns[1].send(b"\0\0")
                    conns[2].send(frame({"id": 1, "op": "resolve", "service": "nope"}) * 200)
                    await trio.sleep(0.01)
                    if stop == "drain":
                        draining.set()
                        for c in conns[1:cap]:
                            c.shutdown(socket.SHUT_WR)
                        await _until(lambda: rt.stats.connections_open == 0, "drained")
                    n.cancel_scope.cancel()
                seen[f"{stop} after"] = dict(lot._open)
                seen[f"{stop} hot"] = lot.hot_waiting
                seen[f"{stop} queued"] = rt.turns.queued
            finally:
                usock.close()
                for c in conns:
                    c.close()

    trio.run(main)
    assert seen == {"drain open": cap, "drain after": {}, "drain hot": 0, "drain queued": 0,
                    "cancel open": cap, "cancel after": {}, "cancel hot": 0, "cancel queued": 0}, seen


def _flood_passes(active_light: bool) -> int:
    """Scheduler passes until 400 wakeups of one heavy process are all answered, while two
    light processes' 8 connections hold the hot slots, idle or resolving back to back."""
    from agentproc import endpoint_toml

    from softlb._filecatalog import parse_catalog_text

    result: dict[str, int] = {}

    async def main() -> None:
        rt = Runtime(AgentConfig(), None, random.Random(1))
        rt.dispatch(rt.engine.replace_all(parse_catalog_text(endpoint_toml("web", "127.0.0.1", 18001)),
                                          trio.current_time()))
        usock, name = abstract_listener()
        light: list[socket.socket] = []
        heavy: list[socket.socket] = []
        req = frame({"id": 1, "op": "resolve", "service": "web"})
        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as n:
                    await serve_with_turns(n, rt, usock)
                    light = [c for cs in other_process_conns(name, 2, LIGHT) for c in cs]
                    await _until(lambda: rt.lot.hot_waiting == HOT, "light connections in the hot slots")
                    for i in range(400):
                        c = socket.socket(socket.AF_UNIX)
                        c.connect("\0" + name)
                        c.setblocking(False)
                        heavy.append(c)
                        if i % 8 == 7:
                            await trio.sleep(0.001)
                    await _until(lambda: rt.stats.connections_open == 400 + len(light), "all accepted")
                    await trio.testing.wait_all_tasks_blocked()

                    async def resolving(c: socket.socket) -> None:
                        c.setblocking(False)
                        while True:
                            c.send(req)
                            await trio.lowlevel.wait_readable(c)
                            c.recv(65536)

                    if active_light:
                        for c in light:
                            n.start_soon(resolving, c)
                        await trio.sleep(0.05)
                    start = rt.turns.passes
                    for c in heavy:
                        c.send(req)
                    left = set(heavy)
                    while left:
                        for c in list(left):
                            try:
                                if c.recv(65536):
                                    left.discard(c)
                            except BlockingIOError:
                                pass
                        await trio.lowlevel.checkpoint()
                    result["passes"] = rt.turns.passes - start
                    n.cancel_scope.cancel()
        finally:
            usock.close()
            for c in light + heavy:
                c.close()

    trio.run(main)
    return result["passes"]


def test_light_connections_resolving_back_to_back_slow_the_lots_queue_but_do_not_stop_it() -> None:
    """Their requests past a spent budget run outside the round robin (`go`), up to HOT a
    pass, and when they run before the releaser in a pass it lets one queued wakeup go:
    measured 39-50 passes for the flood against 30-31 with them idle (546cc67 and now)."""
    idle, active = _flood_passes(False), _flood_passes(True)
    # The budget is halved after a pass that took over SLOW_PASS in measured time.
    assert idle <= 400 // (BUDGET // 2) + 10, idle
    assert active <= 2 * idle + 20, (idle, active)
