"""The watch gate under a hostile local user (found by a review of aa7c7fc): in-process
serve_listener with turns and the lot, real Unix sockets, default limits.

1. A stopped watch (unwatch, or its connection closing) parked for the next change must not
   hand the service's other watches to the gate: nothing changed (it did, at aa7c7fc: each
   unwatch cost a wakeup of every watch of the service).
2. The gate goes round robin by uid, then by process and service: a bystander's watch of
   another service does not wait behind everything one peer put in the gate (at aa7c7fc it
   was one FIFO).
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
from softlb_agent import ipc_server
from softlb_agent.runtime import Runtime

PER_CONN = 250


def _catalog(version: int) -> str:
    # "hot": the service the attacker watches; "quiet": the bystander's.
    return (endpoint_toml("hot", "127.0.0.1", 10000 + version)
            + endpoint_toml("quiet", "127.0.0.1", 20000 + version))


async def _read_until(c: socket.socket, buf: bytearray, n: int) -> list:
    while len(frames(bytes(buf))) < n:
        await trio.lowlevel.wait_readable(c)
        data = c.recv(1 << 20)
        assert data, "agent hung up"
        buf += data
    return frames(bytes(buf))


async def _bystander_watching_quiet(path: str) -> tuple[socket.socket, bytearray]:
    """A bystander's connection watching "quiet", its first answer read, everyone idle."""
    b = socket.socket(socket.AF_UNIX)
    b.connect(path)
    b.setblocking(False)
    bbuf = bytearray()
    b.send(frame({"id": 1, "op": "watch", "service": "quiet"}))
    await _read_until(b, bbuf, 1)
    bbuf.clear()
    await trio.testing.wait_all_tasks_blocked()
    return b, bbuf


async def _harness(tmp_path, attacker_conns: int, body) -> None:
    rt = Runtime(AgentConfig(), None, random.Random(1))
    rt.dispatch(rt.engine.replace_all(parse_catalog_text(_catalog(0)), trio.current_time()))
    path = str(tmp_path / "s.sock")
    lsock = listener(path)
    conns = []
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                await serve_with_turns(n, rt, lsock)
                # The attacker's watches: PER_CONN per connection on "hot".
                for k in range(attacker_conns):
                    c = socket.socket(socket.AF_UNIX)
                    c.connect(path)
                    c.setblocking(False)
                    conns.append((c, bytearray()))
                    c.send(b"".join(frame({"id": i, "op": "watch", "service": "hot"}) for i in range(PER_CONN)))
                for c, buf in conns:
                    await _read_until(c, buf, PER_CONN)
                    buf.clear()
                await trio.testing.wait_all_tasks_blocked()
                await body(rt, path, conns)
                n.cancel_scope.cancel()
    finally:
        lsock.close()
        for c, _ in conns:
            c.close()


def test_an_unwatch_wakes_no_other_watch_of_the_service(tmp_path) -> None:
    """Nothing changed: one unwatch should cost one watch task's end, not a wakeup of every
    other watch of the service (each through the gate)."""
    result: dict[str, int] = {}

    async def body(rt, path, conns) -> None:
        steps = PassSteps("_handle_deferred")
        trio.lowlevel.add_instrument(steps)
        c, buf = conns[0]
        c.send(frame({"id": 10_000, "op": "unwatch", "watch": 7}))
        got = await _read_until(c, buf, 1)
        assert got[0]["id"] == 10_000 and "error" not in got[0]
        for _ in range(200):  # let whatever was woken run through the gate
            await trio.sleep(0)
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.remove_instrument(steps)
        result["steps"] = sum(steps.steps.values())
        # and nothing was sent to anyone: the service did not change
        for c2, _ in conns:
            try:
                extra = c2.recv(1 << 20)
            except BlockingIOError:
                extra = b""
            assert not extra or c2 is c

    trio.run(_harness, tmp_path, 4, body)
    # One watch stopped: its task ends (a few steps). On aa7c7fc: ~1,000 (every watch of
    # "hot" goes through the gate and parks again).
    assert result["steps"] <= 10, result


def test_a_bystanders_watch_update_is_not_queued_behind_another_peers_watches(tmp_path) -> None:
    """The attacker (8 connections x 250 watches of "hot", the default per-connection cap)
    unwatches one of them; right after, the bystander's service changes. The bystander's
    update should go within a few passes, as it did when each service had a pacer of its
    own; with one FIFO gate it waits behind the attacker's 2,000 (~62 passes at 32)."""
    assert _bystander_update_passes(tmp_path, unwatch_first=True) <= 8


def test_a_bystanders_watch_update_is_not_queued_behind_a_busy_services_watches(tmp_path) -> None:
    """Same without the unwatch: "hot" (2,000 watches of one peer, under the default caps)
    changes, and in the next pass the bystander's "quiet" changes. With one FIFO gate over
    every watch (aa7c7fc) the bystander's single update waited behind the 2,000 (~62 passes
    at 32 a pass; at max_watches = 10,000, ~310)."""
    assert _bystander_update_passes(tmp_path, unwatch_first=False) <= 8


def _bystander_update_passes(tmp_path, unwatch_first: bool) -> int:
    """An attacker's 2,000 watches of "hot" (8 connections); the bystander watches "quiet".
    Either the attacker unwatches one (nothing changes), or "hot" changes and its watches
    go to the gate; then "quiet" changes: how many passes until the bystander's update."""
    result: dict[str, int] = {}

    async def body(rt, path, conns) -> None:
        b, bbuf = await _bystander_watching_quiet(path)
        try:
            if unwatch_first:
                c, buf = conns[0]
                c.send(frame({"id": 10_000, "op": "unwatch", "watch": 7}))  # no catalog change needed
                await _read_until(c, buf, 1)
                hot = 10000
            else:
                hot = 10001
                text = endpoint_toml("hot", "127.0.0.1", hot) + endpoint_toml("quiet", "127.0.0.1", 20000)
                rt.dispatch(rt.engine.replace_all(parse_catalog_text(text), trio.current_time()))
                await trio.sleep(0)  # the hot service's leader hands its followers to the gate
                await trio.sleep(0)
            steps = PassSteps("_handle_deferred")
            trio.lowlevel.add_instrument(steps)
            # Only the bystander's service changes.
            text = endpoint_toml("hot", "127.0.0.1", hot) + endpoint_toml("quiet", "127.0.0.1", 20001)
            rt.dispatch(rt.engine.replace_all(parse_catalog_text(text), trio.current_time()))
            start = steps.passes
            await _read_until(b, bbuf, 1)
            result["passes"] = steps.passes - start
            trio.lowlevel.remove_instrument(steps)
        finally:
            b.close()

    trio.run(_harness, tmp_path, 8, body)
    return result["passes"]


def test_watches_stopped_while_parked_at_the_gate_leak_nothing(tmp_path) -> None:
    """Holds: the attacker's 2,000 watches are at the gate (a change of "hot") when all its
    connections close; the gate empties, every watch slot comes back, and the bystander's
    next update still comes."""
    result: dict[str, int] = {}

    async def body(rt, path, conns) -> None:
        hub = ipc_server._hub(rt)
        b, bbuf = await _bystander_watching_quiet(path)
        try:
            text = endpoint_toml("hot", "127.0.0.1", 10001) + endpoint_toml("quiet", "127.0.0.1", 20000)
            rt.dispatch(rt.engine.replace_all(parse_catalog_text(text), trio.current_time()))
            await trio.sleep(0)
            await trio.sleep(0)
            result["at_gate"] = hub.gate.queued
            for c, _ in conns:
                c.close()
            while hub.count > 1:
                await trio.sleep(0.01)
            assert hub.gate.queued == 0
            text = endpoint_toml("hot", "127.0.0.1", 10001) + endpoint_toml("quiet", "127.0.0.1", 20002)
            rt.dispatch(rt.engine.replace_all(parse_catalog_text(text), trio.current_time()))
            with trio.fail_after(5):
                got = await _read_until(b, bbuf, 1)
            assert got[0]["result"]["endpoints"][0]["port"] == 20002
            result["watchers"] = sum(rt.watchers.values())
        finally:
            b.close()

    trio.run(_harness, tmp_path, 8, body)
    assert result["at_gate"] > 1000, result
    assert result["watchers"] == 1, result
