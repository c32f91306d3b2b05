"""Soak: many concurrent clients on the Unix socket resolving and reporting for minutes, while
the catalog churns every second and probes run (issue 10). Loopback and Unix socket only.

    .venv/bin/python bench/soak.py [--duration 180] [--clients 1000] [--procs 4] [--json]
    .venv/bin/python bench/soak.py --short        # CI: 20 s, 200 clients

Each client process runs clients/procs trio connections; each connection loops
resolve(lease) -> report(ok) -> pause --interval, and times the resolve (so the figure
includes the Python client's own scheduling: on a loaded machine that dominates). The agent is a real subprocess with
probes on three live loopback backends; the catalog file is rewritten every second (an
endpoint joins or leaves). Reported: calls/s, resolve p50/p99, failed calls (must be 0),
agent RSS and open fds at start (after warm-up) and end, and the resolve p50/p99 of one
sequential client in its own process (bench/bystander.py's) beside the load. Exit status 1 if a target is
missed: 0 failures, bystander p99 < 5 ms, RSS growth < 10%, no fd growth. Where cgroups are
writable, the agent, the load clients and the bystander each run in a CPU group of their own
(bench/cpugroups.py; `--no-cgroups` to run them in one).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from agentproc import AgentProcess, endpoint_toml  # noqa: E402
from cpugroups import CpuGroups  # noqa: E402

CONFIG = """
[services.web]
[services.web.probe]
interval = "200ms"
timeout = "500ms"
"""


def client_proc(sock_path: str, n: int, interval: float, t_start: float, t_end: float, out: mp.Queue) -> None:
    import msgpack
    import trio

    lat: list[float] = []
    calls = errors = 0
    first_error = ""

    async def one() -> None:
        nonlocal calls, errors, first_error
        s = trio.socket.socket(socket.AF_UNIX)
        await s.connect(sock_path)
        unpacker = msgpack.Unpacker(raw=False)
        rid = 0

        async def call(msg: dict) -> dict:
            nonlocal rid
            rid += 1
            msg["id"] = rid
            body = msgpack.packb(msg)
            await s.send(len(body).to_bytes(4, "big") + body)
            buf = b""
            while True:
                if len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                    return msgpack.unpackb(buf[4:], raw=False)
                data = await s.recv(65536)
                if not data:
                    raise ConnectionError("agent closed the connection")
                buf += data

        del unpacker
        while trio.current_time() < t_end_trio:
            t0 = time.monotonic()
            try:
                r = await call({"op": "resolve", "service": "web"})
                dt = time.monotonic() - t0
                if "error" in r:
                    raise RuntimeError(r["error"])
                rep = await call({"op": "report", "lease": r["result"]["lease"], "ok": True, "latency": 0.001})
                if "error" in rep and rep["error"]["code"] != "UNKNOWN_LEASE":
                    raise RuntimeError(rep["error"])
                calls += 2
                if t0 >= t_start:
                    lat.append(dt)
            except Exception as e:
                errors += 1
                first_error = first_error or repr(e)
                await trio.sleep(0.01)
            await trio.sleep(interval)  # a busy service's client, not a flood
        s.close()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)

    t_end_trio = 0.0

    async def run() -> None:
        nonlocal t_end_trio
        t_end_trio = trio.current_time() + (t_end - time.monotonic())
        await main()

    trio.run(run)
    out.put({"lat": lat, "calls": calls, "errors": errors, "first_error": first_error})


def proc_stats(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    ap.add_argument("--clients", type=int, default=1000, help="concurrent connections (default 1000)")
    ap.add_argument("--procs", type=int, default=4, help="client processes (default 4)")
    ap.add_argument("--interval", type=float, default=0.2,
                    help="pause between one client's resolve+report pairs (default 0.2 s: 1,000 clients make "
                         "~5,000 resolves/s, what Python client processes on a small machine can drive)")
    ap.add_argument("--short", action="store_true", help="CI mode: 20 s, 200 clients, 2 processes")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-cgroups", dest="cgroups", action="store_false",
                    help="run every party in one CPU group (default: agent, load clients and bystander each "
                         "in its own where cgroups are writable, as systemd runs each unit)")
    args = ap.parse_args()
    if args.short:
        args.duration, args.clients, args.procs = 20.0, 200, 2
    backends = []
    for _ in range(4):
        b = socket.socket()
        b.bind(("127.0.0.1", 0))
        b.listen(4096)
        backends.append(b)
    ports = [b.getsockname()[1] for b in backends]

    def catalog(i: int) -> str:
        live = ports[:3] + ([ports[3]] if i % 2 else [])
        return "".join(endpoint_toml("web", "127.0.0.1", p, id=f"web-{p}") for p in live)

    tmp = tempfile.mkdtemp(prefix="softlb-soak-")
    agent = AgentProcess(tmp, catalog(0), CONFIG, extra_args=["--log-level", "warning"])
    agent.start()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    warm = 5.0
    t_start = time.monotonic() + warm
    t_end = t_start + args.duration
    per = args.clients // args.procs
    procs = [ctx.Process(target=client_proc, args=(agent.socket, per, args.interval, t_start, t_end, out)) for _ in range(args.procs)]
    stop = threading.Event()
    # A separate sequential client in its own process: what one well-behaved caller sees
    # while the 1,000 load clients run (their own figure includes their process's queueing).
    from bystander import bystander as bystander_proc

    by_out, by_stop = ctx.Queue(), ctx.Event()
    procs.append(ctx.Process(target=bystander_proc, args=(agent.socket, by_out, by_stop)))
    # Each party in a CPU group of its own where cgroups are writable (bench/cpugroups.py).
    groups = CpuGroups.open("soak") if args.cgroups else None
    try:
        for p in procs:
            p.start()
            if groups is not None:
                groups.put("bystander" if p is procs[-1] else "clients", p.pid)
        if groups is not None:
            groups.put("agent", agent.proc.pid)

        def churn() -> None:
            i = 0
            while not stop.wait(1.0):
                i += 1
                agent.write_catalog(catalog(i))

        threading.Thread(target=churn, daemon=True).start()
        time.sleep(max(0.0, t_start - time.monotonic()))
        assert agent.proc is not None
        rss0, fds0 = proc_stats(agent.proc.pid)
        time.sleep(max(0.0, t_end - 1.0 - time.monotonic()))
        rss1, fds1 = proc_stats(agent.proc.pid)  # clients still connected, as at the start
        results = [out.get(timeout=args.duration + 120) for _ in procs[:-1]]
        by_stop.set()
        by = [d for t, d, ok in by_out.get(timeout=60) if t_start <= t < t_end]
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5)
        agent.stop()
        if groups is not None:
            groups.close()
        for b in backends:
            b.close()
    lat = sorted(x for r in results for x in r["lat"])
    calls = sum(r["calls"] for r in results)
    errors = sum(r["errors"] for r in results)
    q = statistics.quantiles(lat, n=100)
    res = {
        "duration_s": args.duration, "clients": args.clients, "processes": args.procs,
        "calls": calls, "calls_per_s": round(calls / (args.duration + warm)), "failed_calls": errors,
        "first_error": next((r["first_error"] for r in results if r["first_error"]), ""),
        "resolve_p50_ms": round(q[49] * 1e3, 3), "resolve_p99_ms": round(q[98] * 1e3, 3),
        "bystander_p50_ms": round(statistics.median(by) * 1e3, 3),
        "bystander_p99_ms": round(statistics.quantiles(by, n=100)[98] * 1e3, 3),
        "cpu_groups": groups is not None, "rss_kb_start": rss0, "rss_kb_end": rss1, "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 1),
        "fds_start": fds0, "fds_end": fds1,
        "loadavg_1m": round(os.getloadavg()[0], 1), "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for k, v in res.items():
            print(f"{k:>16}: {v}")
    ok = errors == 0 and res["bystander_p99_ms"] < 5 and res["rss_growth_pct"] < 10 and fds1 <= fds0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
