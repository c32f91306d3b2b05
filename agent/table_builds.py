"""Consistent-hash table rebuilds (maglev, ring_hash, source_hash), run in steps on the loop.

Why: a maglev table at 1,000 endpoints takes 25-77 ms to build in pure Python, and health
flaps rebuild it every time; done inside the engine call that caused it, that is a stall for
every client on the host (issue 10, item 9). The engine (made with defer_builds) leaves each
rebuild as a `TableBuild` and keeps answering from the old table, guarded so that it never
returns an endpoint outside the current set (softlb/policies/_consistent.py). This task runs
the builds a step (~1 ms) at a time with a checkpoint between steps, so other clients are
answered in between, and installs each table unless a newer change superseded it.

Why steps on the loop rather than a worker thread: the build is pure Python, so a thread
would hold the GIL against the loop anyway; on a busy 2-core host a GIL hand-over was
measured at 100+ ms, worse than the build it would hide. Steps bound the wait by design.
"""

from __future__ import annotations

import logging

import trio

from .runtime import Runtime

log = logging.getLogger("softlb.tables")


async def run_table_builds(rt: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    while True:
        await rt.builds_waiting.wait()
        rt.builds_waiting = trio.Event()
        for job in rt.engine.take_builds():
            if not job.current:
                continue
            start = trio.current_time()
            for _ in job.steps():
                await trio.lowlevel.checkpoint()
                if not job.current:  # superseded: the newer build is queued already
                    rt.stats.table_builds_superseded += 1
                    break
            else:
                if job.install():
                    rt.stats.table_builds += 1
                    log.debug("table rebuilt for %d endpoints in %.1f ms", len(job.endpoints),
                              (trio.current_time() - start) * 1e3)
