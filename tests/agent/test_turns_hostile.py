"""Turns under a hostile local user (found by a review of the lot and turns): in-process
serve_listener on a Unix socket and the loopback port sharing one runtime, turns and lot,
real sockets.

- All of 127.0.0.0/8 is loopback on Linux: any local user can connect from 127.0.0.2,
  127.0.0.3, ... If each TCP source address were a group of its own in the uid ring, binding
  addresses would buy turns as forking once did; all TCP peers are one group.
- A connection whose answers its peer does not read waits to write: that wait is in the lot
  too, so such connections closed together are let go a budget per pass.
"""

from __future__ import annotations

import random
import socket

import trio
import trio.testing
from agentproc import endpoint_toml
from helpers.frames import frame
from helpers.passes import PassSteps, serve_with_turns
from test_drain_edges import frames, listener

from softlb import AgentConfig
from softlb._filecatalog import parse_catalog_text
from softlb_agent.listeners import ConnectionBudget, ConnectionLimits
from softlb_agent.runtime import Runtime

FLOOD = 400


def _bystander_passes(tmp_path, distinct_sources: bool, bystander_tcp: bool = False) -> int:
    """FLOOD TCP connections of one local user each send a resolve, then a Unix-socket
    bystander does: how many scheduler passes until the bystander has its answer."""
    result: dict[str, int] = {}

    async def main() -> None:
        rt = Runtime(AgentConfig(), None, random.Random(1))
        rt.dispatch(rt.engine.replace_all(parse_catalog_text(endpoint_toml("web", "127.0.0.1", 18001)),
                                          trio.current_time()))
        path = str(tmp_path / "s.sock")
        usock = listener(path)
        tsock = socket.socket(socket.AF_INET)
        tsock.bind(("127.0.0.1", 0))
        tsock.listen(1024)
        port = tsock.getsockname()[1]
        budget = ConnectionBudget(ConnectionLimits.from_config(rt.config), rt.stats)
        attackers: list[socket.socket] = []
        b = socket.socket(socket.AF_INET if bystander_tcp else socket.AF_UNIX)
        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as n:
                    await serve_with_turns(n, rt, usock, tsock, budget=budget)
                    for i in range(FLOOD):
                        a = socket.socket(socket.AF_INET)
                        if distinct_sources:
                            a.bind((f"127.0.{1 + i // 250}.{2 + i % 250}", 0))
                        a.connect(("127.0.0.1", port))
                        a.setblocking(False)
                        attackers.append(a)
                        if i % 8 == 7:
                            await trio.sleep(0.001)
                    b.connect(("127.0.0.1", port) if bystander_tcp else path)
                    b.setblocking(False)
                    while rt.stats.connections_open < FLOOD + 1:
                        await trio.sleep(0.01)
                    await trio.testing.wait_all_tasks_blocked()
                    steps = PassSteps("_run")
                    trio.lowlevel.add_instrument(steps)
                    req = frame({"id": 1, "op": "resolve", "service": "web"})
                    for a in attackers:
                        a.send(req)
                    b.send(req)
                    start = steps.passes
                    buf = b""
                    while not frames(buf):
                        await trio.lowlevel.wait_readable(b)
                        buf += b.recv(65536)
                    result["passes"] = steps.passes - start
                    trio.lowlevel.remove_instrument(steps)
                    assert frames(buf)[0]["result"]["port"] == 18001
                    n.cancel_scope.cancel()
        finally:
            usock.close()
            tsock.close()
            b.close()
            for a in attackers:
                a.close()

    trio.run(main)
    return result["passes"]


def test_control_one_source_address_the_bystander_goes_at_once(tmp_path) -> None:
    assert _bystander_passes(tmp_path, distinct_sources=False) <= 6


def test_a_local_user_binding_many_loopback_addresses_gets_no_more_turns(tmp_path) -> None:
    # On 444ea44: ~FLOOD / BUDGET = 50 passes (one ring place per source address).
    assert _bystander_passes(tmp_path, distinct_sources=True) <= 6


def test_connections_stuck_writing_are_not_all_woken_in_one_pass(tmp_path) -> None:
    """The lot bounds wakeups of connections waiting to *read*. A connection whose answers
    the peer does not read waits in trio's own `wait_writable` (Connection.send), outside the
    lot and the turns: one peer with N such connections closes them together and trio runs
    all N tasks in one pass (what the lot was made to prevent)."""
    conns_n = 300
    result: dict[str, int] = {}

    async def main() -> None:
        rt = Runtime(AgentConfig(), None, random.Random(1))
        text = "".join(endpoint_toml("big", "127.0.0.1", 10000 + i, id=f"e{i}-" + "x" * 40) for i in range(300))
        rt.dispatch(rt.engine.replace_all(parse_catalog_text(text), trio.current_time()))
        path = str(tmp_path / "s.sock")
        usock = listener(path)
        held: list[socket.socket] = []
        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as n:
                    await serve_with_turns(n, rt, usock)
                    req = b"".join(frame({"id": i, "op": "endpoints", "service": "big"}) for i in range(40))
                    for _ in range(conns_n):
                        a = socket.socket(socket.AF_UNIX)
                        a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                        a.connect(path)
                        a.setblocking(False)
                        a.send(req)  # ~40 x 30 KB of answers, never read
                        held.append(a)
                        await trio.sleep(0.001)  # let the accept loop keep the backlog short
                    while rt.stats.connections_open < conns_n:
                        await trio.sleep(0.01)
                    # every connection's task ends up blocked in wait_writable
                    for _ in range(200):
                        await trio.sleep(0.01)
                    await trio.testing.wait_all_tasks_blocked()
                    steps = PassSteps("_run")
                    trio.lowlevel.add_instrument(steps)
                    for a in held:
                        a.close()
                    while rt.stats.connections_open:
                        await trio.sleep(0.01)
                    trio.lowlevel.remove_instrument(steps)
                    result["max"] = max(steps.steps.values())
                    n.cancel_scope.cancel()
        finally:
            usock.close()
            for a in held:
                a.close()

    trio.run(main)
    # The lot lets BUDGET / END_COST hang-ups go a pass (at 444ea44 every writer went at
    # once: 300 steps in one pass); a connection's end is about two steps.
    from softlb_agent.turns import BUDGET, END_COST

    assert result["max"] <= 2 * (BUDGET // END_COST + 1), result


def test_the_lot_counts_a_process_connections_and_all_of_tcp_together(tmp_path) -> None:
    """What makes a peer light (agent/lot.py): its open connections, counted as they are
    accepted and end; on TCP every address counts as one crowd (binding more of
    127.0.0.0/8 must not make a flood light)."""
    import os

    async def main() -> None:
        rt = Runtime(AgentConfig(), None, random.Random(1))
        path = str(tmp_path / "s.sock")
        usock = listener(path)
        tsock = socket.socket(socket.AF_INET)
        tsock.bind(("127.0.0.1", 0))
        tsock.listen(64)
        port = tsock.getsockname()[1]
        me = f"{os.getuid()}:{os.getpid()}"
        socks: list[socket.socket] = []
        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as n:
                    await serve_with_turns(n, rt, usock, tsock)
                    for _ in range(3):
                        s = socket.socket(socket.AF_UNIX)
                        s.connect(path)
                        socks.append(s)
                    for i in range(2):
                        s = socket.socket(socket.AF_INET)
                        s.bind((f"127.0.0.{2 + i}", 0))
                        s.connect(("127.0.0.1", port))
                        socks.append(s)
                    while rt.stats.connections_open < 5:
                        await trio.sleep(0.01)
                    assert (rt.lot.connections(me), rt.lot.connections("tcp")) == (3, 2)
                    for s in socks[1:4]:
                        s.close()
                    while rt.stats.connections_open > 2:
                        await trio.sleep(0.01)
                    assert (rt.lot.connections(me), rt.lot.connections("tcp")) == (1, 1)
                    n.cancel_scope.cancel()
        finally:
            for s in socks:
                s.close()
            usock.close()
            tsock.close()

    trio.run(main)
