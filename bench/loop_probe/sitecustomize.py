"""A loop-lag probe for the agent, for finding what holds the loop (issue 10, item 9).

Not part of the agent: Python imports `sitecustomize` at start-up from the path, so putting
this directory on PYTHONPATH with SOFTLB_PROBE=<file> set arms it in every `python -m
softlb_agent` started from there (the benches start the agent that way; other processes
ignore it). It writes to <file>:

- STEP <ms> cpu <ms> <task>: a trio task step over SOFTLB_PROBE_STEP_MS (default 20) ms (a
  trio Instrument), and the loop thread's CPU time in it;
- LONG STEP in progress: the loop thread's stack, sampled once a step has run 50 ms;
- GIL/sleep lateness <ms>: a thread that sleeps 1 ms woke that late (the GIL was held);
- with SOFTLB_PROBE_WHERE=1, for passes of over 200 steps, where the tasks resumed (the
  three innermost coroutine frames each was suspended in);
- GC gen <n> took <ms>: a collection over SOFTLB_PROBE_STEP_MS, and in which thread (with
  SOFTLB_PROBE_GC_SIZES=1, how many objects the collected generations held);
- PASS <ms> cpu <ms> <steps> <top task names>: a scheduler pass (I/O poll to I/O poll) whose work took
  over SOFTLB_PROBE_PASS_MS (default 3) ms, the loop thread's CPU time in it, and how many
  task steps it ran and whose; then its biggest step, if over half that, and where that
  task is suspended now (the checkpoint it reached after the work).

    SOFTLB_PROBE=/tmp/probe.txt PYTHONPATH=bench/loop_probe \\
        .venv/bin/python bench/bystander.py --only giant_service
"""

import gc
import os
import sys
import threading
import time
import traceback

_out = os.environ.get("SOFTLB_PROBE")
if _out and sys.argv and sys.argv[0] == "-m":  # `python -m softlb_agent ...` (argv[0] is "-m" here)
    import trio
    import trio.abc

    _f = open(_out, "a", buffering=1)  # noqa: SIM115 - open for the life of the process

    def _log(*a: object) -> None:
        _f.write("%.4f %s\n" % (time.monotonic(), " ".join(str(x) for x in a)))

    _step_ms = float(os.environ.get("SOFTLB_PROBE_STEP_MS", "20")) / 1e3
    _where = bool(os.environ.get("SOFTLB_PROBE_WHERE"))
    _gc: dict[str, float] = {}
    _gc_sizes = bool(os.environ.get("SOFTLB_PROBE_GC_SIZES"))

    def _suspended_at(task: trio.lowlevel.Task) -> str:
        """Where a task is about to resume: its innermost awaiting coroutine frame."""
        coro, where = task.coro, ["?"]
        for _ in range(50):
            frame = getattr(coro, "cr_frame", None)
            if frame is not None:
                where.append("%s:%d" % (frame.f_code.co_name, frame.f_lineno))
            nxt = getattr(coro, "cr_await", None)
            if nxt is None:
                break
            coro = nxt
        return "<".join(reversed(where[-3:]))

    def _gc_timer(phase: str, info: dict) -> None:
        if phase == "start":
            if _gc_sizes:  # O(objects): a diagnostic that slows every collection
                g = info["generation"]
                _gc["n"] = sum(len(gc.get_objects(i)) for i in range(g + 1))
            _gc["t"] = time.perf_counter()
            return
        took = time.perf_counter() - _gc.get("t", time.perf_counter())
        if took > _step_ms:
            _log("GC gen", info["generation"], "took %.1f ms" % (took * 1e3), "collected", info["collected"],
                 "thread", threading.current_thread().name,
                 "objects %d" % _gc["n"] if _gc_sizes else "")

    gc.callbacks.append(_gc_timer)
    _state: dict = {"start": None, "task": None, "main": None}
    _pass_ms = float(os.environ.get("SOFTLB_PROBE_PASS_MS", "3")) / 1e3
    _pass: dict = {"start": None, "steps": {}}

    class _Steps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            _state["start"], _state["task"] = time.perf_counter(), task.name
            _state["cpu"] = time.thread_time()

        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            took = time.perf_counter() - _state["start"]
            _state["start"] = None
            if took > _step_ms:
                _log("STEP %.1f ms cpu %.1f ms" % (took * 1e3, (time.thread_time() - _state["cpu"]) * 1e3), task.name)
            steps = _pass["steps"]
            steps[task.name] = steps.get(task.name, 0) + 1
            cpu = time.thread_time() - _state["cpu"]
            if cpu > _pass.get("big", (0.0,))[0]:
                _pass["big"] = (cpu, task)
            if _where:
                _pass.setdefault("where", {})
                w = _pass["where"]
                k = _suspended_at(task)
                w[k] = w.get(k, 0) + 1

        def after_io_wait(self, timeout: float) -> None:
            _pass["where"] = {}
            _pass["start"] = time.perf_counter()
            _pass["cpu"] = time.thread_time()
            _pass["steps"] = {}
            _pass["big"] = (0.0, None)

        def before_io_wait(self, timeout: float) -> None:
            s = _pass["start"]
            if s is None:
                return
            took = time.perf_counter() - s
            if took > _pass_ms:
                steps = _pass["steps"]
                top = sorted(steps.items(), key=lambda kv: -kv[1])[:4]
                _log("PASS %.1f ms cpu %.1f ms" % (took * 1e3, (time.thread_time() - _pass["cpu"]) * 1e3),
                     sum(steps.values()),
                     " ".join("%s=%d" % (".".join(n.split(".")[-2:]), c) for n, c in top))
                cpu, task = _pass["big"]
                if task is not None and cpu > _pass_ms / 2:
                    _log("  biggest step: cpu %.1f ms %s, now at %s" % (cpu * 1e3, ".".join(task.name.split(".")[-2:]),
                                                                     _suspended_at(task)))
                if _where and sum(steps.values()) > 200:
                    w = sorted(_pass.get("where", {}).items(), key=lambda kv: -kv[1])[:4]
                    _log("  resumed at:", "; ".join("%s x%d" % kv for kv in w))

    _run = trio.run

    def _run_probed(*a, **k):  # type: ignore[no-untyped-def]
        _state["main"] = threading.get_ident()
        k.setdefault("instruments", []).append(_Steps())
        return _run(*a, **k)

    trio.run = _run_probed

    def _sampler() -> None:
        last, reported = time.perf_counter(), None
        while True:
            time.sleep(0.001)
            now = time.perf_counter()
            if now - last > 0.05:
                _log("GIL/sleep lateness %.1f ms" % ((now - last) * 1e3))
            last = now
            s = _state["start"]
            if s is not None and now - s > 0.05 and reported != s:
                reported = s
                frame = sys._current_frames().get(_state["main"])
                if frame is not None:
                    _log("LONG STEP in progress (%.0f ms) %s:\n" % ((now - s) * 1e3, _state["task"])
                         + "".join(traceback.format_stack(frame)[-12:]))

    threading.Thread(target=_sampler, daemon=True, name="probe").start()
    _log("probe on", sys.argv)
