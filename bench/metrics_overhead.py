"""Benchmark: the resolve path with metrics on, against the code from before, in one run.

    .venv/bin/python bench/metrics_overhead.py --base 6bcaa9e [--rounds 5] [--calls 20000]

Issue 14 added per-request counters (resolves by result, picks per endpoint, reports) and a
prometheus-client collector. The promise: resolve with metrics on stays within 10% of the
figure before. Figures on this shared machine drift minute to minute, so both agents run
side by side and are measured interleaved (A, B, A, B...), each figure the median of
--rounds, and the verdict is the ratio:

  base   the agent at --base (exported with `git archive`, bench/resolve.py's export_revision),
         admin port off, as bench/resolve.py runs it;
  now    this tree's agent with its admin port on and /metrics scraped every second
         during the whole run (a Prometheus would scrape every 15-60 s).

Measured (bench/resolve.py's functions, the real thin client): sequential resolves on the
Unix socket (calls/s, p50, p99), 16 concurrent client processes, and pipelined batches;
each measure runs A B B A (then B A A B next round) so neither side always goes first.
Beside the wall-clock figures it reports the agent's own CPU time per call (from
/proc/PID/task/*/schedstat, scrapes included for "now"): on a shared machine that is the
steadier figure, since waiting for a core does not count.
Both agents are subprocesses on temporary sockets and loopback ports, stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from agentproc import free_port  # noqa: E402
from resolve import CATALOG, concurrent, export_revision, pipelined, seq  # noqa: E402

def start(tmp: str, name: str, pythonpath: str | None, admin: str) -> tuple[subprocess.Popen[bytes], str]:
    d = os.path.join(tmp, name)
    os.makedirs(d)
    cat = os.path.join(d, "catalog.toml")
    with open(cat, "w") as f:
        f.write(CATALOG)
    sock = os.path.join(d, "softlb.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "softlb_agent", "agent", "--catalog-file", cat, "--socket", sock, "--listen", "",
         "--admin", admin, "--log-level", "warning"],
        env=dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None,
        cwd=d,  # `-m` puts the working directory first on sys.path: not this checkout's
    )
    from softlb_client import Client

    deadline = time.monotonic() + 15
    while True:
        try:
            with Client(socket_path=sock, timeout=0.5) as c:
                c.hello()
            return proc, sock
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{name} agent did not start")
            time.sleep(0.05)


def cpu_ns(pid: int) -> int:
    """CPU time the process has run, in ns, over all its threads (/proc/PID/task/*/schedstat).
    Unlike wall-clock rates it hardly moves when other jobs share the cores."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            continue
    return total


def scraper(admin: str, stop: threading.Event, counts: list[int], interval: float) -> None:
    while not stop.wait(interval):
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
            assert b"softlb_resolves_total" in r.read()
        counts[0] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision of the code before (e.g. 6bcaa9e)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between scrapes (0: none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict[str, list[float]]] = {"base": {}, "now": {}}
    with tempfile.TemporaryDirectory() as tmp:
        shim = export_revision(args.base, tmp)
        admin = f"127.0.0.1:{free_port()}"
        procs = {}
        stop = threading.Event()
        scrapes = [0]
        try:
            procs["base"] = start(tmp, "base", shim, "")
            procs["now"] = start(tmp, "now", None, admin)
            if args.scrape_interval > 0:
                threading.Thread(target=scraper, args=(admin, stop, scrapes, args.scrape_interval), daemon=True).start()
            calls = {"seq": args.calls + 200, "conc16": 16 * (args.calls // 8 + 1), "pipelined": args.calls + 100}
            measures = {
                "seq": lambda sock: seq("unix", sock, args.calls),
                "conc16": lambda sock: concurrent(sock, 16, args.calls // 8),
                "pipelined": lambda sock: pipelined(sock, args.calls // 50),
            }
            for i in range(args.rounds):
                for what, fn in measures.items():
                    # A B B A, then B A A B: neither side always runs first or after the
                    # other's 16 client processes.
                    order = ("base", "now", "now", "base") if i % 2 == 0 else ("now", "base", "base", "now")
                    for name in order:
                        proc, sock = procs[name]
                        cpu0 = cpu_ns(proc.pid)
                        for k, v in fn(sock).items():
                            results[name].setdefault(f"{what}_{k}", []).append(v)
                        per_call = (cpu_ns(proc.pid) - cpu0) / calls[what] / 1000
                        results[name].setdefault(f"{what}_agent_cpu_us_per_call", []).append(per_call)
        finally:
            stop.set()
            for proc, _ in procs.values():
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    ratio = {k: med["now"][k] / med["base"][k] for k in med["base"]}
    out = {"base": args.base, "rounds": args.rounds, "scrapes": scrapes[0], "median": med, "ratio_now_over_base": ratio}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"base {args.base} vs now (metrics on, {scrapes[0]} scrapes), median of {args.rounds} interleaved rounds")
    for k in med["base"]:
        print(f"  {k:20s} base {med['base'][k]:>12,.1f}   now {med['now'][k]:>12,.1f}   now/base {ratio[k]:.3f}")


if __name__ == "__main__":
    main()
