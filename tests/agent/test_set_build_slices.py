"""A big endpoint set is applied in slices bounded in time (agent/table_builds.py): each
slice is a scheduler pass every other caller may wait behind (issue 10, one giant service)."""

from __future__ import annotations

import itertools
import random

import trio

from softlb import AgentConfig, Endpoint, EndpointSetBuild
from softlb_agent import table_builds
from softlb_agent.runtime import Runtime

from helpers.passes import PassSteps


def _endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(id=f"e{i}", address=f"10.0.{i // 250}.{i % 250 + 1}", port=8000) for i in range(n)]


def _apply(monkeypatch, n: int, tick: float) -> tuple[Runtime, PassSteps]:
    """Apply an n-endpoint set with run_set_build, a clock read advancing `tick` seconds."""
    clock = itertools.count()
    monkeypatch.setattr(table_builds, "_clock", lambda: next(clock) * tick)
    steps = PassSteps("run_set_build")
    made: list[Runtime] = []

    async def main() -> None:
        rt = Runtime(AgentConfig(), None, random.Random(1))
        made.append(rt)
        build = rt.engine.begin_set_service("giant", _endpoints(n), trio.current_time())
        assert isinstance(build, EndpointSetBuild)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(table_builds.run_set_build, rt, build, name="run_set_build")

    trio.run(main, instruments=[steps])
    return made[0], steps


def test_a_slow_slice_ends_after_one_unit_of_work(monkeypatch) -> None:
    """A clock past the slice at every read: one unit (64 endpoints of work) a slice. The
    counted slices of 256 endpoints took 4 times fewer steps."""
    rt, steps = _apply(monkeypatch, 4000, tick=1.0)
    assert [e.id for e in rt.engine.services["giant"].endpoints][-1] == "e3999"
    work = 4000 * 5  # at least: dedupe, pack, health entries, derive, prepare: each a pass over the set
    assert sum(steps.steps.values()) >= work // 64
    assert max(steps.steps.values()) == 1  # one slice per pass


def test_a_stalled_clock_still_ends_slices(monkeypatch) -> None:
    """A clock that never moves: a slice ends at SET_BUILD_MAX units all the same."""
    rt, steps = _apply(monkeypatch, 4000, tick=0.0)
    assert "giant" in rt.engine.services
    per = table_builds.SET_BUILD_UNIT * table_builds.SET_BUILD_MAX
    assert 4000 * 5 // per <= sum(steps.steps.values()) <= 4000 * 8 // per


def test_a_slice_runs_steps_until_its_time_is_up_or_its_cap_and_sees_the_end(monkeypatch) -> None:
    """The slice set builds and table builds (maglev, ring_hash) share: small steps, bounded
    in time and in number."""
    ran: list[int] = []

    def build(n: int):
        def step() -> bool:
            ran.append(len(ran))
            return len(ran) >= n  # the build is complete

        return step

    # A clock read advancing 0.1 ms: a 0.4 ms slice runs 4 steps (each read after a step).
    clock = itertools.count()
    monkeypatch.setattr(table_builds, "_clock", lambda: next(clock) * 0.0001)
    assert not table_builds._slice(build(10), table_builds.TABLE_BUILD_MAX)
    assert len(ran) == 4
    # A stalled clock: the cap bounds the slice.
    monkeypatch.setattr(table_builds, "_clock", lambda: 0.0)
    ran.clear()
    assert not table_builds._slice(build(100), table_builds.TABLE_BUILD_MAX)
    assert len(ran) == table_builds.TABLE_BUILD_MAX
    # The end of the build is seen, and said.
    ran.clear()
    assert table_builds._slice(build(3), table_builds.TABLE_BUILD_MAX)
    assert len(ran) == 3
