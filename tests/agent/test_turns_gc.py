"""Turns (agent/turns.py): round-robin turns between peers when a pass has more wakeups than
its budget; and the garbage collector's full collections on a timer (agent/gc_pauses.py)."""

from __future__ import annotations

import collections
from collections import deque
import gc
import socket
import sys
import time
import urllib.request
import weakref

import trio
import trio.testing

from agentproc import THREE, AgentProcess, wait_until
from softlb_agent.gc_pauses import THRESHOLDS, run_full_collections
from softlb_agent.runtime import Runtime
from softlb_agent.turns import Turns
from softlb import AgentConfig


def _flood_then_bystander(budget: int, flood: int, attackers: int = 1) -> tuple[list[tuple[int, str]], Turns]:
    """`flood` tasks of `attackers` peers of one uid ("1000:<pid>") and one of peer
    "bystander" all woken in the same pass; returns (pass, peer) in the order they did their
    work (attackers as "attacker"), passes counted from the wake."""
    order: list[tuple[int, str]] = []

    async def main() -> None:
        turns = Turns(budget)
        async with trio.open_nursery() as nursery:
            await nursery.start(turns.run)
            go = trio.Event()
            first = [0]

            async def conn(key: str) -> None:
                await go.wait()  # every task wakes in the same pass, as epoll would wake them
                if not turns.free(key):  # as the lot does for each readable connection
                    await turns.wait(key)
                order.append((turns.passes - first[0], "bystander" if key == "bystander" else "attacker"))

            for i in range(flood):
                nursery.start_soon(conn, f"1000:{i % attackers}")
            nursery.start_soon(conn, "bystander")
            await trio.testing.wait_all_tasks_blocked()
            first[0] = turns.passes + 1
            go.set()
            while len(order) < flood + 1:
                await trio.sleep(0)
            nursery.cancel_scope.cancel()
        result.append(turns)

    result: list[Turns] = []
    trio.run(main)
    return order, result[0]


def test_a_pass_within_budget_runs_everyone_at_once() -> None:
    order, turns = _flood_then_bystander(budget=64, flood=20)
    assert len(order) == 21 and turns.queued_total == 0
    assert {p for p, _ in order} == {0}


def test_a_flood_queues_and_the_bystander_goes_within_a_few_turns() -> None:
    # Without turns the bystander, woken with 2,000 others, would run in their pass at a
    # random place: on average behind ~1,000 of them.
    for _ in range(5):
        order, turns = _flood_then_bystander(budget=16, flood=2000)
        assert sorted(k for _, k in order) == ["attacker"] * 2000 + ["bystander"]
        assert turns.queued_total > 1900
        passes = {k: p for p, k in order}
        # The wake pass runs 16; the bystander queued then goes in the next release, which
        # runs in the pass after; the attacker's last connection ~2000/16 passes later.
        assert passes["bystander"] <= 2
        assert passes["attacker"] >= 2000 // 16 - 2
        per_pass = collections.Counter(p for p, _ in order)
        assert max(per_pass.values()) <= 16 + 1


def test_a_user_forking_many_processes_gets_one_share() -> None:
    # 500 processes of one uid, each a peer of its own: per-process turns would put the
    # bystander behind 500 others (~60 passes at 8 a pass); by uid first, it goes at once.
    order, turns = _flood_then_bystander(budget=8, flood=2000, attackers=500)
    passes = {k: p for p, k in order}
    assert passes["bystander"] <= 2
    assert turns._ring == deque() and turns._groups == {}


def test_a_cancelled_wait_leaves_the_queue() -> None:
    async def main() -> None:
        turns = Turns(1)
        async with trio.open_nursery() as nursery:
            # No releaser running: waiters stay queued until cancelled.
            turns.free("a")
            with trio.move_on_after(0.01):
                await turns.wait("a")
            assert turns._queues == {} and not turns._ring and not turns._groups
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_full_collections_run_on_the_timer_and_free_old_cycles() -> None:
    before = gc.get_threshold()

    class Node:
        pass

    async def main() -> None:
        rt = Runtime(AgentConfig())
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_full_collections(
                rt, interval=0.05, growth=0, min_growth=0, task_status=task_status))
            assert gc.get_threshold() == THRESHOLDS and gc.get_freeze_count() > 0
            a, b = Node(), Node()
            a.other, b.other = b, a  # a cycle: only the cyclic collector frees it
            gone = trio.Event()
            weakref.finalize(a, gone.set)
            for _ in range(3):  # age it into the oldest generation
                gc.collect(1)
            del a, b
            with trio.fail_after(5):
                await gone.wait()
            assert rt.stats.gc_full_collections >= 1
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_timer_tick_collects_fully_only_once_memory_grew_by_the_share() -> None:
    """A big catalog makes a full walk slow (~85 ms at 100,000 endpoints): a steady agent
    pays it only after its memory grew by FULL_GROWTH, CPython's own rule."""
    before = gc.get_threshold()

    async def main() -> None:
        rt = Runtime(AgentConfig())
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_full_collections(
                rt, interval=0.02, growth=0.25, min_growth=10_000, task_status=task_status))
            while rt.stats.gc_full_skipped < 3:  # steady: ticks, no collection
                await trio.sleep(0.01)
            assert rt.stats.gc_full_collections == 0
            grown = [[i] for i in range(max(20_000, sys.getallocatedblocks() // 2))]
            with trio.fail_after(5):
                while rt.stats.gc_full_collections == 0:
                    await trio.sleep(0.01)
            skipped = rt.stats.gc_full_skipped
            while rt.stats.gc_full_skipped < skipped + 3:  # what it left is the new base
                await trio.sleep(0.01)
            assert rt.stats.gc_full_collections == 1
            del grown
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_the_agent_runs_with_the_collector_settled_and_says_so_in_metrics(tmp_path) -> None:
    agent = AgentProcess(str(tmp_path), THREE).start()
    try:
        text = _metrics(agent)
        assert "softlb_gc_full_collections_total 0.0" in text
        assert "softlb_gc_full_seconds_max 0.0" in text
        with agent.client() as c:  # and it serves
            assert c.resolve("web").port
    finally:
        agent.stop()


def test_a_thousand_connections_closed_at_once_take_turns_in_the_agent(tmp_path) -> None:
    """One peer closes 900 connections together: their wakeups queue for turns (counted),
    and a resolve from this process on its own connection is answered meanwhile."""
    import multiprocessing as mp

    agent = AgentProcess(str(tmp_path), THREE).start()
    try:
        ctx = mp.get_context("fork")
        ready, close = ctx.Event(), ctx.Event()

        def flooder() -> None:
            held = []
            for _ in range(900):
                s = socket.socket(socket.AF_UNIX)
                s.connect(agent.socket)
                held.append(s)
            ready.set()
            close.wait(20)
            for s in held:
                s.close()

        p = ctx.Process(target=flooder)
        p.start()
        try:
            assert ready.wait(20)
            with agent.client() as c:
                assert c.resolve("web").port
                time.sleep(0.5)  # the agent has accepted them all
                close.set()
                for _ in range(50):
                    assert c.resolve("web").port
        finally:
            p.join(20)
            if p.is_alive():
                p.kill()
        assert wait_until(lambda: _value(_metrics(agent), "softlb_turns_queued_total") > 0, 10)
    finally:
        agent.stop()


def _metrics(agent: AgentProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.admin_port}/metrics", timeout=5) as r:
        return r.read().decode()


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


def test_a_peer_with_nothing_queued_passes_while_another_peers_queue_waits() -> None:
    async def main() -> None:
        turns = Turns(4)  # no releaser: what is queued stays queued
        async with trio.open_nursery() as nursery:
            assert all(turns.free("a") for _ in range(4))
            assert not turns.free("a") and not turns.free("b")  # the pass is spent
            nursery.start_soon(turns.wait, "a")
            await trio.testing.wait_all_tasks_blocked()
            turns.passes += 1  # a new pass
            assert turns.free("b"), "b has nothing queued and the pass has units"
            assert not turns.free("a"), "a's later wakeups keep their place behind its queue"
            nursery.cancel_scope.cancel()

    trio.run(main)
