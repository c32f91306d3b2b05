"""The lot (agent/lot.py): idle connections wait in the agent's own epoll set, and a flood
of them made readable at once is let go a budget per scheduler pass, round robin by peer."""

from __future__ import annotations

import socket
import time

import pytest
import trio
import trio.testing
from helpers.passes import PassSteps

from softlb_agent.lot import HOT, LIGHT, Lot
from softlb_agent.turns import Turns


def _flood(n: int, budget: int, *, lot: bool, hot: int = 0, slow: bool = False) -> tuple[PassSteps, int, int]:
    """`n` connections of one peer and one bystander's, parked, all made readable at once.
    Returns the steps per pass, the pass the bystander ran in and the pass the last of the
    flood ran in (both counted from the pass that saw them readable). `slow`: a task holds
    the loop 2 ms in every pass (as a collection or a big step would)."""
    pairs = [socket.socketpair() for _ in range(n + 1)]
    steps = PassSteps("conn")
    ran: dict[str, int] = {}

    async def main() -> None:
        turns = Turns(budget)
        the_lot = Lot(turns, hot=hot)
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
                the_lot.opened(key)
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


def test_with_the_calm_fast_path_a_starting_flood_wakes_at_most_hot_more_in_one_pass() -> None:
    # The first HOT connections parked while nobody was queued wait in trio's epoll: trio
    # wakes them all in the flood's first pass; those that find no turn queue (one more
    # step each, later), and every pass after that is the lot's budget.
    steps, bystander, attacker = _flood(400, budget=8, lot=True, hot=HOT)
    per_pass = [steps.steps[p] for p in sorted(steps.steps)]
    assert per_pass[0] <= HOT + 8 + 1
    assert max(per_pass[1:]) <= 8 + 1
    assert 401 <= sum(per_pass) <= 401 + HOT
    assert bystander <= 2
    assert attacker >= 400 // 8 - 2


def test_after_a_slow_pass_the_lot_lets_half_a_budget_go() -> None:
    """The budget is in counted units; a pass that took longer than turns.SLOW_PASS in
    measured time (whatever made it slow) halves the next one's."""
    steps, bystander, attacker = _flood(400, budget=16, lot=True, slow=True)
    assert sum(steps.steps.values()) == 401
    assert max(steps.steps.values()) <= 16 // 2 + 1
    assert bystander <= 2
    assert attacker >= 400 // 8 - 2


def test_calm_waits_go_to_trio_up_to_hot_and_the_rest_and_any_during_a_flood_to_the_lot() -> None:
    async def main() -> None:
        turns = Turns()  # no releaser: a queued task stays queued
        lot = Lot(turns, hot=4)  # a heavy peer may take half: 2
        for _ in range(LIGHT + 1):  # one process holding more than a light peer's share
            lot.opened("1:1")
        pairs = [socket.socketpair() for _ in range(4)]
        woke: list[int] = []
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(lot.run)

                async def conn(i: int) -> None:
                    pairs[i][0].setblocking(False)
                    await lot.wait_readable(pairs[i][0], "1:1")
                    woke.append(i)

                for i in range(3):
                    nursery.start_soon(conn, i)
                    await trio.testing.wait_all_tasks_blocked()
                assert (lot.hot_waiting, lot.parked) == (2, 1)
                # A flood is on (someone is queued): a heavy peer's new wait goes to the
                # lot however many hot slots are free.
                pairs[0][1].send(b"x")
                with trio.fail_after(5):
                    while 0 not in woke:
                        await trio.sleep(0.01)
                assert lot.hot_waiting == 1
                flood = trio.CancelScope()

                async def queued() -> None:  # stands for a flood's queued connection
                    with flood:
                        await turns.wait("9:9")

                nursery.start_soon(queued)
                await trio.testing.wait_all_tasks_blocked()
                assert not turns.calm
                nursery.start_soon(conn, 3)
                await trio.testing.wait_all_tasks_blocked()
                assert (lot.hot_waiting, lot.parked) == (1, 2)
                flood.cancel()
                for _, b in pairs[1:]:
                    b.send(b"x")
                with trio.fail_after(5):
                    while len(woke) < 4:
                        await trio.sleep(0.01)
                assert (lot.hot_waiting, lot.parked) == (0, 0)
                nursery.cancel_scope.cancel()
        finally:
            for a, b in pairs:
                a.close()
                b.close()

    trio.run(main)


def test_during_a_flood_a_light_peer_waits_in_trio_and_goes_on_when_woken_and_a_heavy_one_queues() -> None:
    """A process with a connection or two (a caller) keeps the one-wakeup path while another
    floods, and its request goes on past a spent budget; the flooding process's connections
    wait in the lot and queue for their turn."""

    async def main() -> None:
        turns = Turns(budget=0)  # every budgeted wakeup queues; no releaser: it stays queued
        lot = Lot(turns, hot=2)
        for _ in range(LIGHT + 1):
            lot.opened("1:heavy")
        lot.opened("1:light")
        pairs = [socket.socketpair() for _ in range(3)]
        woke: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(lot.run)

                async def conn(i: int, key: str) -> None:
                    pairs[i][0].setblocking(False)
                    await lot.wait_readable(pairs[i][0], key)
                    woke.append(key)

                async def queued() -> None:  # the flood: one of the heavy peer's, queued
                    await turns.wait("1:heavy")

                nursery.start_soon(queued)
                await trio.testing.wait_all_tasks_blocked()
                assert not turns.calm
                nursery.start_soon(conn, 0, "1:heavy")
                nursery.start_soon(conn, 1, "1:light")
                await trio.testing.wait_all_tasks_blocked()
                assert (lot.hot_waiting, lot.parked) == (1, 1)
                pairs[0][1].send(b"x")
                pairs[1][1].send(b"x")
                with trio.fail_after(5):
                    while "1:light" not in woke:
                        await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked()
                assert woke == ["1:light"] and turns.queued == 2  # the heavy one waits its turn
                # Closing connections makes a heavy peer light again.
                lot.closed("1:heavy")
                nursery.start_soon(conn, 2, "1:heavy")
                await trio.testing.wait_all_tasks_blocked()
                assert lot.hot_waiting == 1
                # Woken, it still queues behind its own peer's queued wakeups (order kept).
                pairs[2][1].send(b"x")
                await trio.sleep(0.05)
                await trio.testing.wait_all_tasks_blocked()
                assert woke == ["1:light"] and turns.queued == 3
                nursery.cancel_scope.cancel()
        finally:
            for a, b in pairs:
                a.close()
                b.close()

    trio.run(main)


def _slots_after(opened: dict[str, int], waits: list[list[str]], *, flood: bool) -> list[tuple[int, int]]:
    """With `opened` connections counted per peer, park a connection of each key in each
    list of `waits` in turn (while another peer is queued, if `flood`): (hot, parked) after
    each list."""
    seen: list[tuple[int, int]] = []

    async def main() -> None:
        turns = Turns()
        lot = Lot(turns, hot=HOT)
        for key, n in opened.items():
            for _ in range(n):
                lot.opened(key)
        pairs = [socket.socketpair() for _ in range(sum(map(len, waits)))]
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(lot.run)
                if flood:
                    nursery.start_soon(turns.wait, "9:9")
                    await trio.testing.wait_all_tasks_blocked()
                socks = iter(a for a, _ in pairs)
                for keys in waits:
                    for key in keys:
                        sock = next(socks)
                        sock.setblocking(False)
                        nursery.start_soon(lot.wait_readable, sock, key)
                    await trio.testing.wait_all_tasks_blocked()
                    seen.append((lot.hot_waiting, lot.parked))
                nursery.cancel_scope.cancel()
        finally:
            for a, b in pairs:
                a.close()
                b.close()

    trio.run(main)
    return seen


def test_a_process_holding_many_idle_connections_takes_half_the_slots_and_a_light_one_finds_one() -> None:
    seen = _slots_after({"1:heavy": 50, "1:light": 1}, [["1:heavy"] * 50, ["1:light"]], flood=False)
    assert seen == [(HOT // 2, 50 - HOT // 2), (HOT // 2 + 1, 50 - HOT // 2)]


def test_one_user_light_processes_take_half_the_slots_and_another_user_finds_one() -> None:
    mine = [f"1:{i}" for i in range(HOT)]  # HOT light processes of uid 1
    seen = _slots_after({**dict.fromkeys(mine, 1), "2:1": 1}, [mine, ["2:1"]], flood=True)
    assert seen == [(HOT // 2, HOT - HOT // 2), (HOT // 2 + 1, HOT - HOT // 2)]


def test_go_passes_a_spent_budget_but_not_the_peers_own_queue() -> None:
    turns = Turns(budget=1)
    assert turns.free("1:1")
    assert not turns.free("1:2")  # the pass's budget is spent
    assert turns.go("1:2")  # a light peer's wakeup goes on, and is charged
    assert turns.used == 2
    turns.park(object(), "1:3")  # type: ignore[arg-type]  (only stored)
    assert not turns.go("1:3")  # behind its own queued one
    assert turns.used == 2


def test_a_cancelled_wait_leaves_the_lot_and_the_queue_and_the_socket_can_park_again() -> None:
    async def main() -> None:
        turns = Turns(budget=0)  # every wakeup queues; no releaser runs, so it stays queued
        lot = Lot(turns, hot=0)
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
        lot = Lot(Turns(), hot=0)  # what is checked here is the lot's own parking
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
