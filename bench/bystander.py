"""Benchmark: one well-behaved client's resolve latency alone, then while each attack runs
(issue 10), all in one run against one real agent subprocess (loopback and Unix socket only).

    .venv/bin/python bench/bystander.py [--phase 5] [--big 100000] [--json] [--only NAME ...]
    PYTHONPATH=/tmp/base .venv/bin/python bench/bystander.py --baseline   # an older agent
                          # (/tmp/base: `git archive REV | tar -x`, plus softlb_agent -> agent)
    .venv/bin/python bench/bystander.py --only big_reload giant_service  # the big-catalog phases

The bystander is its own process: one connection on the Unix socket, one sequential
`resolve` every millisecond, each timed. Phases, each --phase seconds:

  alone          nothing else runs
  cpu_burn       a control, not an attack: 4 processes spinning in the attackers' CPU group and
                 touching nothing of the agent's; what is left of the bystander's p99 under an
                 attack beyond this is the agent's doing, this much is the kernel scheduler's
  pipelining     a client writing 4,000 pipelined resolves per send and reading in a thread
  watch_flood    10,000 watches (40 connections x 250) on the service the bystander resolves,
                 while the catalog changes every 250 ms
  conn_flood     4 processes opening Unix-socket connections as fast as they can, to the caps
  big_reload     a --big endpoint catalog (1,000 services) is written; phase lasts until it
                 is applied (at least --phase seconds)
  giant_service  one service of --big endpoints is written (the catalog's other services
                 unchanged); phase lasts until it is applied (at least --phase seconds)
  maglev_flap    a 1,000-endpoint maglev service whose endpoints flap (catalog rewritten
                 every 200 ms with one endpoint toggled to critical)
  proxy_http     wrk -t2 -c256, keep-alive, through the agent's http proxy listener to a fast
                 backend (an HAProxy answering itself): a local user driving the loopback proxy
                 flat out (needs wrk and haproxy; skipped, saying so, without them)
  proxy_tcp      the same through a tcp proxy listener (the bytes relayed, no parsing)

Reported per phase: bystander calls, p50, p99, max, errors, and p99 / alone p99. The issue's
target is bystander p99 <= 5 ms under every attack. The attacker processes are stopped by pid.

CPU groups: where cgroups are writable, the agent, the bystander and the attackers each run in
a CPU group of its own with equal weight (bench/cpugroups.py), as systemd runs each unit and
each login user's slice: four attacker processes then share one party's CPU instead of taking
four shares of the machine's two CPUs from the agent. `--no-cgroups` runs them all in one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from agentproc import THREE, AgentProcess, endpoint_toml, free_port  # noqa: E402
from cpugroups import CpuGroups  # noqa: E402
from helpers.frames import frame  # noqa: E402

LIMITS = """
[agent]
max_watches = 10000
max_watches_per_connection = 256
"""
CONFIG = """
[services.mg]
policy = "maglev"
"""


def maglev_catalog(flap: int | None) -> str:
    return "".join(
        endpoint_toml("mg", f"10.1.{i // 250}.{i % 250 + 1}", 8000, id=f"mg-{i}",
                      **({"registry": "critical"} if i == flap else {}))
        for i in range(1000))


#: The proxy_flood phase's backend (an HAProxy answering itself), when wrk and haproxy exist.
PROXY_BACKEND: list[int] = []


def base_catalog(web_extra: bool = False, flap: int | None = None) -> str:
    extra = endpoint_toml("web", "127.0.0.1", 18004, id="web-4") if web_extra else ""
    pw = "".join(endpoint_toml(f"pw{m}", "127.0.0.1", port, id=f"pw-{port}") for port in PROXY_BACKEND
                 for m in ("http", "tcp"))
    return THREE + extra + pw + maglev_catalog(flap)


def giant_catalog(n: int) -> str:
    return base_catalog() + "".join(
        f'[[services.giant.endpoints]]\naddress = "10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}"\nport = {1000 + i % 50000}\n'
        for i in range(n))


def big_catalog(n: int) -> str:
    per = max(1, n // 1000)
    return base_catalog() + "".join(
        f'[[services.big{s}.endpoints]]\naddress = "10.{s % 250}.{i // 250 % 250}.{i % 250 + 1}"\nport = {1000 + i}\n'
        for s in range(1000) for i in range(per))


# ----------------------------------------------------------------------------- processes


def bystander(sock_path: str, out: mp.Queue, stop: mp.Event) -> None:
    from softlb_client import Client

    samples: list[tuple[float, float, bool]] = []
    with Client(socket_path=sock_path, timeout=5) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            ok = True
            try:
                c.resolve("web", lease=False)
            except Exception:
                ok = False
            samples.append((t0, time.monotonic() - t0, ok))
            time.sleep(0.001)
    out.put(samples)


def schedstat(pid: int) -> list[int]:
    """Time on a CPU (ns), time runnable but waiting for one (ns), and timeslices, so far."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return [0, 0, 0]


def burner(stop: mp.Event) -> None:
    while not stop.is_set():
        for _ in range(100_000):
            pass


def pipeliner(sock_path: str, stop: mp.Event) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    batch = b"".join(frame({"id": i, "op": "resolve", "service": "web", "lease": False}) for i in range(4000))

    def read() -> None:
        try:
            while s.recv(1 << 20):
                pass
        except OSError:
            pass

    threading.Thread(target=read, daemon=True).start()
    try:
        while not stop.is_set():
            s.sendall(batch)
    except OSError:
        pass


def watcher(sock_path: str, n_conns: int, per: int, stop: mp.Event) -> None:
    socks = []
    for _ in range(n_conns):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock_path)
        s.sendall(b"".join(frame({"id": i, "op": "watch", "service": "web"}) for i in range(per)))
        socks.append(s)
    # Read (and drop) every update, as a real watcher would, so the agent's sends go through.
    import selectors

    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    while not stop.is_set():
        for key, _ in sel.select(0.1):
            try:
                key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
            except OSError:
                pass


def connector(sock_path: str, stop: mp.Event) -> None:
    held: list[socket.socket] = []
    while not stop.is_set():
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock_path)
            held.append(s)
        except OSError:
            time.sleep(0.001)
        if len(held) > 2000:  # keep churning: close the oldest half
            for s in held[:1000]:
                s.close()
            del held[:1000]


class Popened:
    """A subprocess with the little of multiprocessing.Process's interface the phases use
    (pid, join, is_alive), so an attacker may be a program such as wrk."""

    def __init__(self, args: list[str], **kw: object) -> None:
        self.proc = subprocess.Popen(args, **kw)  # type: ignore[call-overload]
        self.pid = self.proc.pid

    def join(self, timeout: float | None = None) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def is_alive(self) -> bool:
        return self.proc.poll() is None


# ----------------------------------------------------------------------------- phases


def run(args: argparse.Namespace) -> dict:
    ctx = mp.get_context("fork")
    tmp = tempfile.mkdtemp(prefix="softlb-bystander-")
    procs: list = []
    proxy = ""
    missing = [t for t in ("wrk", "haproxy") if shutil.which(t) is None]
    floods = [m for m in ("http", "tcp") if not args.only or f"proxy_{m}" in args.only]
    flooding = not missing and floods
    if flooding:
        PROXY_BACKEND[:] = [free_port()]
        listen = {m: free_port() for m in floods}
        with open(os.path.join(tmp, "backend.cfg"), "w") as f:
            f.write(f"defaults\n    mode http\n    timeout client 30s\nfrontend b\n    bind 127.0.0.1:{PROXY_BACKEND[0]}\n"
                    "    http-request return status 200 content-type text/plain string ok\n")
        procs.append(Popened(["haproxy", "-f", os.path.join(tmp, "backend.cfg")]))
        # One service per listener: a service has one proxy listener.
        proxy = "".join(f'[services.pw{m}.proxy]\nlisten = "127.0.0.1:{listen[m]}"\nmode = "{m}"\n' for m in floods)
    agent = AgentProcess(tmp, base_catalog(), ("" if args.baseline else LIMITS) + CONFIG + proxy,
                         extra_args=["--log-level", "warning"])
    try:
        agent.start()
    except BaseException:
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=5)
        raise
    # Each party in a CPU group of its own, as systemd runs each unit (see bench/cpugroups.py).
    groups = CpuGroups.open("bystander") if args.cgroups else None
    try:
        out = ctx.Queue()
        stop_all = ctx.Event()
        by = ctx.Process(target=bystander, args=(agent.socket, out, stop_all))
        by.start()
        procs.append(by)
        if groups is not None:
            groups.put("agent", agent.proc.pid)
            groups.put("bystander", by.pid)
        time.sleep(1.0)
        phases: list[tuple[str, float, float]] = []
        sched: dict[str, dict[str, list[int]]] = {}

        def phase(name: str, start_attack, stop_attack=None, until=None) -> None:
            if args.only and name not in args.only and name != "alone":
                return
            stop = ctx.Event()
            t0 = time.monotonic()  # the window opens with the attack: its first blow counts
            sched0 = {who: schedstat(pid) for who, pid in (("agent", agent.proc.pid), ("bystander", by.pid))}
            workers = start_attack(stop) if start_attack else []
            procs.extend(workers)
            deadline = time.monotonic() + args.phase
            while time.monotonic() < deadline or (until is not None and not until() and time.monotonic() < t0 + 120):
                time.sleep(0.05)
            t1 = time.monotonic()
            sched[name] = {who: [b - a for a, b in zip(sched0[who], schedstat(pid))]
                           for who, pid in (("agent", agent.proc.pid), ("bystander", by.pid))}
            stop.set()
            if stop_attack:
                stop_attack()
            for w in workers:
                w.join(timeout=5)
                if w.is_alive():
                    os.kill(w.pid, signal.SIGKILL)
                    w.join(timeout=5)
            phases.append((name, t0, t1))
            time.sleep(1.0)  # let it settle before the next

        def spawn(target, *a, n=1):
            def start(stop):
                ps = [ctx.Process(target=target, args=(*a, stop)) for _ in range(n)]
                for p in ps:
                    p.start()
                    if groups is not None:
                        groups.put("attacker", p.pid)
                return ps
            return start

        phase("alone", None)
        phase("cpu_burn", spawn(burner, n=4))
        phase("pipelining", spawn(pipeliner, agent.socket))

        churn_stop = threading.Event()

        def churn(make, every):
            def loop():
                i = 0
                while not churn_stop.is_set():
                    agent.write_catalog(make(i))
                    i += 1
                    churn_stop.wait(every)
            t = threading.Thread(target=loop, daemon=True)
            t.start()
            return t

        def watch_start(stop):
            ps = spawn(watcher, agent.socket, 10, 250, n=4)(stop)
            time.sleep(2.0)  # the watches are in place
            churn_stop.clear()
            churn(lambda i: base_catalog(web_extra=i % 2 == 0), 0.25)
            return ps

        phase("watch_flood", watch_start, churn_stop.set)
        agent.write_catalog(base_catalog())
        phase("conn_flood", spawn(connector, agent.socket, n=4))

        def served(service: str) -> bool:
            """Whether the agent answers for `service` yet: how a phase sees its catalog applied
            (the last service of the file). Asked over the socket, one cheap resolve: polling
            /metrics instead rendered the whole 100,000-endpoint catalog 20 times a second, an
            attack of its own (Prometheus scrapes every 15-60 s)."""
            from softlb_client import Client, SoftLBError

            try:
                with Client(socket_path=agent.socket, timeout=5) as c:
                    c.resolve(service, lease=False)
                return True
            except SoftLBError:
                return False
            except OSError:  # an agent stalled by the attack (older revisions) answers late
                return False

        def big_start(stop):
            agent.write_catalog(big_catalog(args.big))
            return []

        phase("big_reload", big_start, until=lambda: served("big999"))
        agent.write_catalog(base_catalog())
        time.sleep(3)

        def giant_start(stop):
            agent.write_catalog(giant_catalog(args.big))
            return []

        phase("giant_service", giant_start, until=lambda: served("giant"))
        if not args.only or "giant_service" in args.only:
            agent.write_catalog(base_catalog())
            time.sleep(3)

        def flap_start(stop):
            churn_stop.clear()
            churn(lambda i: base_catalog(flap=i % 1000 if i % 2 else None), 0.2)
            return []

        phase("maglev_flap", flap_start, churn_stop.set)
        if flooding:
            def wrk_start(port):
                def start(stop):
                    w = Popened(["wrk", "-t2", "-c256", f"-d{max(1, round(args.phase))}s", f"http://127.0.0.1:{port}/"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    if groups is not None:
                        groups.put("attacker", w.pid)
                    return [w]
                return start

            for m in floods:
                phase(f"proxy_{m}", wrk_start(listen[m]))
        elif floods:
            print(f"proxy floods: skipped: no {' or '.join(missing)} on PATH", file=sys.stderr)
        stop_all.set()
        samples = out.get(timeout=60)
        by.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5)
        agent.stop()
        if groups is not None:
            groups.close()
    if args.samples:
        with open(args.samples, "w") as f:
            f.writelines("%.6f %.6f %d\n" % (t, d, ok) for t, d, ok in samples)
    result = {}
    for name, t0, t1 in phases:
        # A call belongs to the phase it ended in: one that waited through a stall counts.
        lat = sorted(d for t, d, ok in samples if t0 <= t + d < t1 and ok)
        errors = sum(1 for t, d, ok in samples if t0 <= t + d < t1 and not ok)
        if not lat:
            result[name] = {"calls": 0, "errors": errors}
            continue
        q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
        result[name] = {"calls": len(lat), "errors": errors, "p50_ms": round(q[49] * 1e3, 3),
                        "p99_ms": round(q[98] * 1e3, 3), "max_ms": round(lat[-1] * 1e3, 3),
                        "seconds": round(t1 - t0, 1), "window": [round(t0, 4), round(t1, 4)]}
        for who, (run_ns, wait_ns, slices) in sched.get(name, {}).items():
            # CPU used, and time spent runnable but waiting for a CPU, per second of the phase:
            # what the kernel scheduler, not the agent's loop, adds to a call.
            result[name][f"{who}_cpu"] = round(run_ns / 1e9 / (t1 - t0), 2)
            result[name][f"{who}_wait_ms_per_slice"] = round(wait_ns / 1e6 / max(slices, 1), 3)
    result["machine"] = {"loadavg_1m": round(os.getloadavg()[0], 1), "cpus": os.cpu_count(),
                         "cpu_groups": groups is not None}
    alone = result.get("alone", {}).get("p99_ms")
    for r in result.values():
        if alone and "p99_ms" in r:  # (the "machine" entry has none)
            r["p99_ratio"] = round(r["p99_ms"] / alone, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", type=float, default=5.0, help="seconds per phase (default 5)")
    ap.add_argument("--big", type=int, default=100_000,
                    help="endpoints in the big reload and in the giant service (default 100000)")
    ap.add_argument("--only", nargs="*", default=[], help="run only these attack phases (and alone)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--samples", default="",
                    help="write every bystander call to this file: start (monotonic s), duration (s), ok")
    ap.add_argument("--baseline", action="store_true",
                    help="leave out the settings older agents lack (run with PYTHONPATH=<an older checkout> "
                         "to measure that revision's agent)")
    ap.add_argument("--no-cgroups", dest="cgroups", action="store_false",
                    help="run every party in the bench's own CPU group (default: the agent, the bystander "
                         "and the attackers each in a group of its own where cgroups are writable, as "
                         "systemd runs each unit)")
    args = ap.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{'phase':<14}{'calls':>7}{'errors':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'p99/alone':>10}")
    for name, r in result.items():
        if name == "machine":
            groups = "each party in its own CPU group" if r["cpu_groups"] else "one CPU group for all"
            print(f"load average {r['loadavg_1m']} on {r['cpus']} CPUs; {groups}")
            continue
        print(f"{name:<14}{r['calls']:>7}{r['errors']:>7}{r.get('p50_ms', '-'):>9}{r.get('p99_ms', '-'):>9}"
              f"{r.get('max_ms', '-'):>9}{r.get('p99_ratio', '-'):>10}"
              f"{r.get('agent_cpu', '-'):>10}{r.get('agent_wait_ms_per_slice', '-'):>11}")
    bad = [n for n, r in result.items() if r.get("errors") or r.get("p99_ms", 0) > 5.0]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
