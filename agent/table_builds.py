"""Work the engine leaves to be done in steps on the loop: consistent-hash table rebuilds
(maglev, ring_hash, source_hash) and big endpoint sets (issue 10, item 9).

Why: a maglev table at 1,000 endpoints takes 25-77 ms to build in pure Python, and health
flaps rebuild it every time; applying one 100,000-endpoint service is ~1-2.5 s, and a
5,000-endpoint Consul service changing every second cost ~278 ms per change. Done inside the
engine call that caused it, each is a stall for every client on the host. The engine (made
with defer_builds) leaves a `TableBuild` for each rebuild, and `begin_set_service` returns an
`EndpointSetBuild` for a big set; both keep answering from the old state meanwhile
(softlb/policies/_consistent.py, softlb/_set_build.py). This module runs them a step (~1 ms)
at a time with a checkpoint between steps, so other clients are answered in between, and
installs each unless a newer change superseded it.

Why steps on the loop rather than a worker thread: the work is pure Python, so a thread
would hold the GIL against the loop anyway; on a busy 2-core host a GIL hand-over was
measured at 100+ ms, worse than the build it would hide. Steps bound the wait by design.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import trio

from softlb import NO_CHANGES, Changes, EndpointSetBuild

from .runtime import Runtime

log = logging.getLogger("softlb.tables")

#: A build's slice between two checkpoints, in time: it runs small steps of work until
#: SLICE seconds have passed, at most a cap of them (the cap bounds it if the clock stalls).
#: A set build's step is SET_BUILD_UNIT endpoints (the build's own grain, softlb/_set_build.py
#: CHUNK; ~0.1-0.2 ms here), at most SET_BUILD_MAX a slice: counted slices of 256 endpoints
#: were 0.5 ms on a quiet machine and 1.5-2.5 ms of CPU under load (the loop probe,
#: bench/bystander.py --only giant_service), ~400 passes in a 100,000-endpoint build each a
#: bystander could wait behind. A table build's (maglev, ring_hash, source_hash) is one of
#: its generator's steps (~0.1 ms quiet), at most TABLE_BUILD_MAX: steps of ~1 ms counted
#: work were 2-10 ms of CPU under load (maglev flapping). Measured time keeps a slice short
#: whatever the machine's speed or load.
SLICE = 0.0004
SET_BUILD_UNIT = 64
SET_BUILD_MAX = 8
TABLE_BUILD_MAX = 16
_DONE = object()
_clock = time.perf_counter


async def run_table_builds(rt: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    while True:
        await rt.builds_waiting.wait()
        rt.builds_waiting = trio.Event()
        while rt.set_build_queue:
            await run_set_build(rt, rt.set_build_queue.pop(0))
        for job in rt.engine.take_builds():
            if not job.current:
                continue
            start = trio.current_time()
            steps = job.steps()
            while not _slice(lambda: next(steps, _DONE) is _DONE, TABLE_BUILD_MAX):
                await trio.lowlevel.checkpoint()
                if not job.current:  # superseded: the newer build is queued already
                    rt.stats.table_builds_superseded += 1
                    break
            else:
                if job.install():
                    rt.stats.table_builds += 1
                    log.debug("table rebuilt for %d endpoints in %.1f ms", len(job.endpoints),
                              (trio.current_time() - start) * 1e3)


async def run_set_build(rt: Runtime, build: EndpointSetBuild) -> Changes:
    """Run a set build in steps, then install it and dispatch what changed (nothing if a
    newer update of the service superseded it meanwhile)."""
    start = trio.current_time()
    while build.current and not _slice(functools.partial(build.step, SET_BUILD_UNIT), SET_BUILD_MAX):
        await trio.lowlevel.checkpoint()
    if not build.current:
        rt.stats.set_builds_superseded += 1
        return NO_CHANGES
    changes = rt.engine.install_set(build, trio.current_time())
    rt.stats.set_builds += 1
    rt.dispatch(changes)
    log.debug("%s: %d endpoints applied in steps in %.1f ms", build.name, len(build.given),
              (trio.current_time() - start) * 1e3)
    return changes


def _slice(step: Callable[[], bool], most: int) -> bool:
    """One slice of a build (see SLICE): `step` until it says the build is complete (True
    is returned then), SLICE has passed, or `most` steps ran."""
    until = _clock() + SLICE
    for _ in range(most):
        if step():
            return True
        if _clock() >= until:
            break
    return False
