"""A trio instrument counting, per scheduler pass, the steps of the tasks a test cares about:
how the isolation tests see that a flood is let go a bounded number per pass."""

from __future__ import annotations

import collections
import trio


class PassSteps(trio.abc.Instrument):
    """`steps[pass]`: how many steps of tasks whose name ends with `suffix` ran in that pass
    (passes counted by I/O polls)."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.passes = 0
        self.steps: collections.Counter[int] = collections.Counter()

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.suffix):
            self.steps[self.passes] += 1



async def serve_with_turns(nursery: trio.Nursery, rt: object, *socks: object, budget: object = None) -> None:
    """Start in `nursery` what the agent runs around its IPC listeners (agent/app.py): the
    turns, the lot, and `serve_listener` on each of `socks` (sharing `budget`, if given)."""
    from softlb_agent import ipc_server
    from softlb_agent.lot import Lot
    from softlb_agent.turns import Turns

    rt.turns = Turns()  # type: ignore[attr-defined]
    await nursery.start(rt.turns.run)  # type: ignore[attr-defined]
    rt.lot = Lot(rt.turns)  # type: ignore[attr-defined]
    await nursery.start(rt.lot.run)  # type: ignore[attr-defined]
    for s in socks:
        await nursery.start(lambda task_status, s=s: ipc_server.serve_listener(
            rt, s, budget=budget, task_status=task_status))
