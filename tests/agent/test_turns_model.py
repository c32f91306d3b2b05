"""Turns as a state machine (hypothesis): any sequence of wakeups asking `free` or `go`
(a light peer's, agent/lot.py), tasks queued with a cost, cancelled ones discarded, the
releaser's passes and new scheduler passes keeps the ring consistent, each peer's queue in
order, the pass's units counted, and lets every group go once before any goes twice.

The releaser's `trio.lowlevel.reschedule` is replaced by a list append: the tasks here are
plain objects, never run."""

from __future__ import annotations

import collections
import time
from unittest import mock

import hypothesis.strategies as st
import trio
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from softlb_agent.turns import Turns, _group

KEYS = ["1:1", "1:2", "1:3", "2:1", "2:2", "127.0.0.1", "127.0.0.2", "unix"]


class TurnsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.turns = Turns(budget=4)
        self.model: dict[str, collections.deque[tuple[object, int]]] = {}
        self.n = 0
        self.clock = 0.0
        self.polled_busy = False

    def _fresh_used(self) -> int:
        t = self.turns
        return 0 if t._seen != t.passes else t.used

    @rule(key=st.sampled_from(KEYS), cost=st.integers(1, 3))
    def park(self, key: str, cost: int) -> None:
        self.n += 1
        task = ("task", self.n)
        self.turns.park(task, key, cost)  # type: ignore[arg-type]
        self.model.setdefault(key, collections.deque()).append((task, cost))

    @rule(key=st.sampled_from(KEYS), cost=st.integers(1, 2))
    def free(self, key: str, cost: int) -> None:
        t = self.turns
        before = self._fresh_used()
        expect = before < t.limit and key not in self.model
        assert t.free(key, cost) is expect
        assert self._fresh_used() == before + (cost if expect else 0)

    @rule(key=st.sampled_from(KEYS), cost=st.integers(1, 2))
    def go(self, key: str, cost: int) -> None:
        t = self.turns
        before = self._fresh_used()
        expect = key not in self.model  # spent or not
        assert t.go(key, cost) is expect
        assert self._fresh_used() == before + (cost if expect else 0)

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, q in self.model.items() if q)))
        q = self.model[key]
        i = data.draw(st.integers(0, len(q) - 1))
        task = q[i][0]
        del q[i]
        if not q:
            del self.model[key]
        self.turns.discard(task, key)  # type: ignore[arg-type]
        self.turns.discard(task, key)  # type: ignore[arg-type]  (twice: a no-op)

    @rule()
    def release(self) -> None:
        t = self.turns
        room = max(1, t.limit - self._fresh_used())
        groups_before = {_group(k) for k in self.model}
        out: list[object] = []
        with mock.patch.object(trio.lowlevel, "reschedule", out.append):
            t._release()
        released_groups = []
        spent = 0
        for task in out:
            # Each peer's tasks leave in the order they queued.
            key = next(k for k, q in self.model.items() if q and q[0][0] is task)
            _, cost = self.model[key].popleft()
            if not self.model[key]:
                del self.model[key]
            released_groups.append(_group(key))
            spent += cost
        if groups_before:
            assert out, "the queue always moves"
        # No more than the pass's room (the last one may overrun it by its own cost).
        assert spent - (cost if out else 0) < room
        # Every group queued at the start goes once before any goes twice.
        first = released_groups[:len(groups_before)]
        assert len(set(first)) == len(first)

    @rule(busy=st.booleans(), slow=st.booleans())
    def next_pass(self, busy: bool, slow: bool) -> None:
        # The pass's length on a clock of the machine's own: Turns halves the next pass's
        # budget after a slow one, and the real clock would make the runs differ (hypothesis
        # needs each sequence to replay the same).
        self.clock += 0.01 if slow else 0.0001
        with mock.patch.object(time, "perf_counter", lambda: self.clock):
            self.turns.before_io_wait(0 if busy else 1)
        # A pass is timed only when the poll before it did not wait.
        assert self.turns.limit == (4 // 2 if self.polled_busy and slow else 4)
        self.polled_busy = busy

    @invariant()
    def consistent(self) -> None:
        t = self.turns
        assert {k: [x[0] for x in q] for k, q in t._queues.items()} == \
               {k: [x[0] for x in q] for k, q in self.model.items()}
        assert t.calm is (not self.model)
        assert t.queued == sum(len(q) for q in self.model.values())
        assert sorted(t._ring) == sorted(set(t._ring)) == sorted(t._groups)
        in_groups = [k for peers in t._groups.values() for k in peers]
        assert sorted(in_groups) == sorted(t._queues)
        for g, peers in t._groups.items():
            assert peers and all(_group(k) == g for k in peers)


TestTurnsMachine = TurnsMachine.TestCase
TestTurnsMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
