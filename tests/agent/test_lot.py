"""The lot (agent/lot.py): idle connections wait in the agent's own epoll set, and a flood
of them made readable at once is let go a budget per scheduler pass, round robin by peer."""

from __future__ import annotations

import socket
import time

import pytest
import trio
import trio.testing
from helpers.passes import PassSteps

from softlb_agent.lot import Lot
from softlb_agent.turns import Turns


def _flood(n: int, budget: int, *, lot: bool, slow: bool = False) -> tuple[PassSteps, int, int]:
    """`n` connections of one peer and one bystander's, parked, all made readable at once.
    Returns the steps per pass, the pass the bystander ran in and the pass the last of the
    flood ran in (both counted from the pass that saw them readable). `slow`: a task holds
    the loop 2 ms in every pass (as a collection or a big step would)."""
    pairs = [socket.socketpair() for _ in range(n + 1)]
    steps = PassSteps("conn")
    ran: dict[str, int] = {}

    async def main() -> None:
        turns = Turns(budget)
        the_lot = Lot(turns)
        async with trio.open_nursery() as nursery:
            await nursery.start(turns.run)
            await nursery.start(the_lot.run)
            done = trio.Event()
            left = [n + 1]

            async def hog() -> None:
                while True:
                    time.sleep(0.002)  # blocking on purpose: the pass takes at least this
                    await trio.lowlevel.checkpoint()

            async def conn(sock: socket.socket, key: str) -> None:
                sock.setblocking(False)
                if lot:
                    await the_lot.wait_readable(sock, key)
                else:
                    await trio.lowlevel.wait_readable(sock)
                sock.recv(1)
                ran[key] = steps.passes
                left[0] -= 1
                if not left[0]:
                    done.set()

            for i, (a, _) in enumerate(pairs):
                key = "bystander" if i == n // 2 else "attacker"
                nursery.start_soon(conn, a, key, name=f"{key}-conn")
            await trio.testing.wait_all_tasks_blocked()
            if slow:
                nursery.start_soon(hog)
                for _ in range(3):  # passes the hog made slow, before the flood wakes
                    await trio.lowlevel.checkpoint()
            trio.lowlevel.add_instrument(steps)
            for _, b in pairs:
                b.send(b"x")
            with trio.fail_after(30):
                await done.wait()
            trio.lowlevel.remove_instrument(steps)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    first = min(steps.steps)
    return steps, ran["bystander"] - first, ran["attacker"] - first


def test_without_the_lot_one_pass_runs_the_whole_flood() -> None:
    # What the lot is for: trio wakes every readable waiter in one pass.
    steps, _, _ = _flood(400, budget=8, lot=False)
    assert max(steps.steps.values()) == 401


def test_the_lot_lets_a_budget_go_per_pass_and_the_bystander_goes_first_or_second() -> None:
    steps, bystander, attacker = _flood(400, budget=8, lot=True)
    assert sum(steps.steps.values()) == 401
    assert max(steps.steps.values()) <= 8 + 1
    assert bystander <= 2, "the bystander's peer had nothing queued: its turn comes at once"
    assert attacker >= 400 // 8 - 2


def test_after_a_slow_pass_the_lot_lets_half_a_budget_go() -> None:
    """The budget is in counted units; a pass that took longer than turns.SLOW_PASS in
    measured time (whatever made it slow) halves the next one's."""
    steps, bystander, attacker = _flood(400, budget=16, lot=True, slow=True)
    assert sum(steps.steps.values()) == 401
    assert max(steps.steps.values()) <= 16 // 2 + 1
    assert bystander <= 2
    assert attacker >= 400 // 8 - 2


def test_a_cancelled_wait_leaves_the_lot_and_the_queue_and_the_socket_can_park_again() -> None:
    async def main() -> None:
        turns = Turns(budget=0)  # every wakeup queues; no releaser runs, so it stays queued
        lot = Lot(turns)
        a, b = socket.socketpair()
        with a, b:
            a.setblocking(False)
            async with trio.open_nursery() as nursery:
                await nursery.start(lot.run)
                # Cancelled while parked in the lot.
                with trio.move_on_after(0.05):
                    await lot.wait_readable(a, "p")
                assert lot.parked == 0
                # Cancelled while queued for its turn: readable, so the pump queued it.
                b.send(b"x")
                with trio.move_on_after(0.2):
                    await lot.wait_readable(a, "p")
                assert turns.queued_total == 1
                assert lot.parked == 0 and turns._queues == {} and not turns._ring and not turns._groups
                # The same socket parks again (re-armed, not added twice), and goes once a
                # releaser runs (one a pass, at budget 0).
                nursery.start_soon(turns.run)
                with trio.fail_after(5):
                    await lot.wait_readable(a, "p")
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_wake_lets_a_parked_connection_go_and_a_new_socket_on_a_reused_fd_parks() -> None:
    async def main() -> None:
        lot = Lot(Turns())
        async with trio.open_nursery() as nursery:
            await nursery.start(lot.run)
            a, b = socket.socketpair()
            fd = a.fileno()
            woke = trio.Event()

            async def parked() -> None:
                await lot.wait_readable(a, "p")
                woke.set()

            nursery.start_soon(parked)
            await trio.testing.wait_all_tasks_blocked()
            assert lot.parked == 1
            lot.wake(a)  # what a drain does: nothing was readable
            with trio.fail_after(5):
                await woke.wait()
            a.close()
            b.close()
            # The closed socket left the epoll set; a new one may get the same fd number.
            c, d = socket.socketpair()
            with c, d:
                c.setblocking(False)
                if c.fileno() != fd:
                    pytest.skip("the kernel did not reuse the fd number here")
                d.send(b"x")
                with trio.fail_after(5):
                    await lot.wait_readable(c, "p")
            nursery.cancel_scope.cancel()

    trio.run(main)
