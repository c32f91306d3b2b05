"""Keep Python's full garbage collections off the callers' latency.

CPython's cyclic collector stops the whole process while it walks every tracked object of the
generations it collects. The oldest generation holds everything the agent has kept a while:
its own modules and config (~45,000 objects) and ~43 objects per open connection (task,
coroutines, buffers). A local user holding a thousand idle connections and churning them
made CPython run full collections every few seconds, each 35-80 ms on this machine and up to
370 ms under CPU contention: a stall for every caller (issue 10, the connection flood).

So, once the agent has started:
- `gc.freeze()` moves what start-up built into the permanent generation, which no collection
  walks again (those objects live as long as the process anyway);
- the oldest generation is no longer collected automatically (its threshold is set out of
  reach); the young generations still are, so cycles that die young, most of them, are freed
  as before;
- every FULL_INTERVAL seconds a full collection runs instead, if the interpreter's memory
  (allocated blocks) grew by FULL_GROWTH since the last one: the rare cycle that outlived
  the young generations is still freed once it could matter, at a cost paid at most a few
  times an hour rather than whenever a flood of connections pushes objects into the old
  generation. The growth rule is CPython's own for its full collections (a quarter more
  than the last one left), measured in blocks because the count of objects that reached
  the oldest generation is not exposed: a 100,000-endpoint catalog makes a full walk
  ~85 ms here, which a steady host then pays only after its memory grew by a quarter.

Counted in `Stats.gc_full_collections` and timed in `gc_full_seconds_max`.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("softlb.gc")

FULL_INTERVAL = 300.0
#: Growth of the interpreter's allocated blocks since the last full collection that makes
#: the next timer tick collect fully, as a share of what that one left...
FULL_GROWTH = 0.25
#: ...and at least this many blocks (a small agent's few thousand would otherwise make
#: every tick collect).
FULL_GROWTH_MIN = 50_000
#: Young generations collected more often and so in smaller pieces than CPython's default
#: (700, 10): in a connection flood every new connection's ~43 objects survive their first
#: collection, so the middle generation held ~7,000-10,000 of them when collected, 5-16 ms
#: each here (a stall for every caller, every ~200 connections); at (500, 2) it holds
#: ~1,500, 1-2 ms. The same objects are walked as often either way. The oldest
#: generation's threshold is set out of reach.
THRESHOLDS = (500, 2, 1 << 30)


async def run_full_collections(rt: Runtime, *, interval: float = FULL_INTERVAL, growth: float = FULL_GROWTH,
                               min_growth: int = FULL_GROWTH_MIN,
                               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Settle (see the module docstring), then every `interval` seconds collect fully if the
    interpreter's allocated blocks grew by `growth` (and `min_growth`) since the last one,
    until cancelled; the process's collector is as it was again afterwards (an agent run
    inside another program, as the tests do, must not leave it changed)."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    left = sys.getallocatedblocks()
    try:
        task_status.started()
        while True:
            await trio.sleep(interval)
            if sys.getallocatedblocks() - left <= max(min_growth, growth * left):
                rt.stats.gc_full_skipped += 1
                continue
            t0 = time.perf_counter()
            freed = gc.collect()
            took = time.perf_counter() - t0
            rt.stats.gc_full_collections += 1
            rt.stats.gc_full_seconds_max = max(rt.stats.gc_full_seconds_max, took)
            left = sys.getallocatedblocks()
            log.debug("full collection: %d objects freed in %.1f ms", freed, took * 1000)
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
