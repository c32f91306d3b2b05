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

