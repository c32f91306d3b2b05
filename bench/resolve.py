"""Benchmark: `resolve` round trips over the Unix socket and loopback TCP, beside the same
pick done in-process.

    .venv/bin/python bench/resolve.py [--runs 5] [--json]

Starts a real agent subprocess on a temporary socket and port (loopback only) with a
3-endpoint round-robin service, measures with the real thin client (softlb_client.Client),
stops the agent by pid. Every figure is the median over --runs runs.

  seq_unix / seq_tcp   one client, one call at a time: calls/s, p50, p99
  conc16_unix          16 client processes, each sequential; aggregate calls/s, measured
                       between a start barrier and the last finish (process start excluded)
  pipelined_unix       one client sending batches of 100 resolves per write
  in_process           Engine.resolve() called directly: the floor with no IPC at all
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from agentproc import free_port  # noqa: E402  (tests/ is on the path just above)

CATALOG = """
[[services.web.endpoints]]
address = "127.0.0.1"
port = 18081
[[services.web.endpoints]]
address = "127.0.0.1"
port = 18082
[[services.web.endpoints]]
address = "127.0.0.1"
port = 18083
"""


def start_agent(tmp: str) -> tuple[subprocess.Popen[bytes], str, str]:
    cat = os.path.join(tmp, "catalog.toml")
    with open(cat, "w") as f:
        f.write(CATALOG)
    sock = os.path.join(tmp, "softlb.sock")
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "softlb_agent", "agent", "--catalog-file", cat, "--socket", sock,
         "--listen", addr, "--admin", "", "--log-level", "warning"],
    )
    from softlb_client import Client

    deadline = time.monotonic() + 10
    while True:
        try:
            with Client(socket_path=sock, timeout=0.5) as c:
                c.hello()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("agent did not start")
            time.sleep(0.05)
    return proc, sock, addr


def seq(kind: str, target: str, n: int) -> dict[str, float]:
    from softlb_client import Client

    c = Client(socket_path=target) if kind == "unix" else Client(addr=target)
    for _ in range(200):
        c.resolve("web", lease=False)
    lat = []
    pc = time.perf_counter
    t0 = pc()
    for _ in range(n):
        a = pc()
        c.resolve("web", lease=False)
        lat.append(pc() - a)
    dt = pc() - t0
    c.close()
    lat.sort()
    return {"calls_per_s": n / dt, "p50_us": lat[n // 2] * 1e6, "p99_us": lat[int(n * 0.99)] * 1e6}


def _worker(sock: str, n: int, barrier: mp.Barrier, q: mp.Queue) -> None:  # type: ignore[type-arg]
    from softlb_client import Client

    c = Client(socket_path=sock)
    c.resolve("web", lease=False)
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(n):
        c.resolve("web", lease=False)
    q.put((t0, time.perf_counter()))
    c.close()


def concurrent(sock: str, clients: int, n: int) -> dict[str, float]:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(clients)
    q = ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(sock, n, barrier, q)) for _ in range(clients)]
    for p in ps:
        p.start()
    spans = [q.get(timeout=120) for _ in ps]
    for p in ps:
        p.join(timeout=30)
    start = min(s for s, _ in spans)
    end = max(e for _, e in spans)
    return {"calls_per_s": clients * n / (end - start)}


def pipelined(sock: str, batches: int, batch: int = 100) -> dict[str, float]:
    from softlb_client import Client

    c = Client(socket_path=sock, timeout=5)
    reqs = [{"op": "resolve", "service": "web", "lease": False} for _ in range(batch)]
    c.call_many(reqs)
    t0 = time.perf_counter()
    for _ in range(batches):
        res = c.call_many(reqs)
    dt = time.perf_counter() - t0
    assert all(isinstance(r, dict) for r in res)
    c.close()
    return {"resolves_per_s": batches * batch / dt}


def in_process(n: int) -> dict[str, float]:
    from softlb import AgentConfig
    from softlb._engine import Engine
    from softlb._filecatalog import parse_catalog_text

    eng = Engine(AgentConfig(), random.Random(1))
    eng.replace_all(parse_catalog_text(CATALOG), 0.0)
    msg = {"id": 1, "op": "resolve", "service": "web", "lease": False}
    t0 = time.perf_counter()
    for _ in range(n):
        eng.handle(msg, 0.0, None)
    dt = time.perf_counter() - t0
    return {"resolves_per_s": n / dt, "per_call_us": dt / n * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, sock, addr = start_agent(tmp)
        try:
            for _ in range(args.runs):
                for name, fn in (
                    ("seq_unix", lambda: seq("unix", sock, args.calls)),
                    ("seq_tcp", lambda: seq("tcp", addr, args.calls)),
                    ("conc16_unix", lambda: concurrent(sock, 16, args.calls // 8)),
                    ("pipelined_unix", lambda: pipelined(sock, args.calls // 50)),
                    ("in_process", lambda: in_process(args.calls * 5)),
                ):
                    results.setdefault(name, []).append(fn())
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    if args.json:
        print(json.dumps(med, indent=1))
        return
    for name, m in med.items():
        print(f"{name:16s} " + "  ".join(f"{k} {v:,.1f}" for k, v in m.items()))
    seq_us = med["seq_unix"]["p50_us"]
    print(f"ratio: unix p50 / in-process call = {seq_us / med['in_process']['per_call_us']:.1f}x")


if __name__ == "__main__":
    main()
