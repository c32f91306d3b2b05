"""Benchmark: `resolve` round trips over the Unix socket and loopback TCP, beside the same
pick done in-process.

    .venv/bin/python bench/resolve.py [--runs 5] [--json] [--baseline GIT_REF]

Starts a real agent subprocess on a temporary socket and port (loopback only) with a
3-endpoint round-robin service, measures with the real thin client (softlb_client.Client),
stops the agent by pid. Every figure is the median over --runs runs.

  seq_unix / seq_tcp   one client, one call at a time: calls/s, p50, p99
  conc16_unix          16 client processes, each sequential; aggregate calls/s, measured
                       between a start barrier and the last finish (process start excluded)
  pipelined_unix       one client sending batches of 100 resolves per write
  in_process           Engine.pick() and the answer's encoding called directly: the floor
                       with no IPC at all

--baseline REF also starts an agent built from git revision REF (exported to a temporary
directory, nothing installed) and measures both agents in the same run, alternating A/B in
every round, so "before/after" figures share the machine's state; the ratios are printed.
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


def export_revision(ref: str, tmp: str) -> str:
    """A PYTHONPATH under which `softlb` and `softlb_agent` are revision `ref`'s."""
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    pkgs = os.path.join(tmp, "pkgs")
    os.makedirs(pkgs)
    os.symlink(os.path.join(src, "softlb"), os.path.join(pkgs, "softlb"))
    os.symlink(os.path.join(src, "agent"), os.path.join(pkgs, "softlb_agent"))
    return pkgs


def start_agent(tmp: str, pythonpath: str | None = None) -> tuple[subprocess.Popen[bytes], str, str]:
    os.makedirs(tmp, exist_ok=True)
    cat = os.path.join(tmp, "catalog.toml")
    with open(cat, "w") as f:
        f.write(CATALOG)
    sock = os.path.join(tmp, "softlb.sock")
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "softlb_agent", "agent", "--catalog-file", cat, "--socket", sock,
         "--listen", addr, "--admin", "", "--log-level", "warning"],
        env=dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None,
        cwd=tmp,  # `-m` puts the working directory first on sys.path: not this checkout's
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
    from softlb import AgentConfig, Engine, LeaseScope, ServerConnection, parse_catalog_text

    eng = Engine(AgentConfig(), random.Random(1))
    eng.replace_all(parse_catalog_text(CATALOG), 0.0)
    pick, send = eng.pick, ServerConnection.send_pick
    none = LeaseScope.NONE
    t0 = time.perf_counter()
    for _ in range(n):
        send(1, pick("web", 0.0, scope=none))
    dt = time.perf_counter() - t0
    return {"resolves_per_s": n / dt, "per_call_us": dt / n * 1e6}


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(sock: str, addr: str, calls: int, pid: int) -> dict[str, dict[str, float]]:
    """Each figure, plus the agent's CPU time per call during it: a cost that a busy machine
    inflates far less than it inflates rates and latencies."""
    phases = {
        "seq_unix": (lambda: seq("unix", sock, calls), calls + 200),
        "seq_tcp": (lambda: seq("tcp", addr, calls), calls + 200),
        "conc16_unix": (lambda: concurrent(sock, 16, calls // 8), 16 * (calls // 8 + 1)),
        "pipelined_unix": (lambda: pipelined(sock, calls // 50), (calls // 50 + 1) * 100),
    }
    out = {}
    for name, (run, n) in phases.items():
        c0 = cpu_seconds(pid)
        out[name] = run()
        out[name]["agent_cpu_us_per_call"] = (cpu_seconds(pid) - c0) / n * 1e6
    return out


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def median_of(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--baseline", metavar="GIT_REF", help="also measure an agent built from this revision, A/B in one run")
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {}
    base: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            proc, sock, addr = start_agent(os.path.join(tmp, "now"))
            procs.append(proc)
            if args.baseline:
                bproc, bsock, baddr = start_agent(os.path.join(tmp, "base"), export_revision(args.baseline, os.path.join(tmp, "rev")))
                procs.append(bproc)
            for i in range(args.runs):
                # Alternate which agent goes first, so drift in the machine's state (other
                # load, CPU frequency) does not favour one side.
                order = [("now", sock, addr, results, proc.pid)]
                if args.baseline:
                    order.append(("base", bsock, baddr, base, bproc.pid))
                    if i % 2:
                        order.reverse()
                for _, s, a, into, pid in order:
                    for name, r in measure(s, a, args.calls, pid).items():
                        into.setdefault(name, []).append(r)
                results.setdefault("in_process", []).append(in_process(args.calls * 5))
        finally:
            for p in procs:
                stop(p)
    med = median_of(results)
    if args.json:
        out = {"now": med}
        if base:
            out["baseline"] = {"ref": args.baseline, **median_of(base)}
        print(json.dumps(out if base else med, indent=1))
        return
    for name, m in med.items():
        print(f"{name:16s} " + "  ".join(f"{k} {v:,.1f}" for k, v in m.items()))
    seq_us = med["seq_unix"]["p50_us"]
    print(f"ratio: unix p50 / in-process call = {seq_us / med['in_process']['per_call_us']:.1f}x")
    if base:
        bmed = median_of(base)
        print(f"\nbaseline {args.baseline}, measured in the same run (now / baseline):")
        for name, m in bmed.items():
            print(f"{name:16s} " + "  ".join(
                f"{k} {m[k]:,.1f} (ratio {med[name][k] / m[k]:.2f})" for k in m))


if __name__ == "__main__":
    main()
