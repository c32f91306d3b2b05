"""Benchmark: the loopback proxy beside direct connections and beside HAProxy, in one run.

    .venv/bin/python bench/proxy.py [--rounds 3] [--duration 3] [--bulk-mib 1024] [--json]
    .venv/bin/python bench/proxy.py --baseline DIR   # A/B: DIR's agent too (`git archive main | tar -x -C DIR`)

Starts (all on loopback, all stopped by pid at the end):
  - two HTTP backends: one HAProxy process answering `http-request return` (fast, so the
    backend is not what is measured), on two ports;
  - a bulk server (sends N bytes per connection) and a gRPC server (grpcio, bytes in/out);
  - a softlb agent with a tcp, an http and an http2 listener in front of them;
  - HAProxy in front of the same backends: `mode tcp` and `mode http` (keep-alive to the
    servers, its defaults otherwise; Debian's package), with one thread by default like the
    agent's one event loop (--haproxy-threads 0: HAProxy's default, a thread per CPU).
Then, for --rounds rounds, each round running every target once in turn (A/B/C, A/B/C, ...
so drift hits all alike), measures:
  ka      wrk -t1 -c32, keep-alive, small GETs: requests/s
  close   wrk -t1 -c32 with `Connection: close`: a connection per request: requests/s
  lat     wrk -t1 -c1, keep-alive: p50 and p99 latency (wrk --latency)
  bulk    one connection moving --bulk-mib MiB from the bulk server: MiB/s, and the
          proxy's CPU per GiB (utime+stime from /proc)
  grpc    one grpcio channel, sequential unary calls: calls/s, the median call, and the
          agent's CPU per call (utime+stime from /proc over the calls)
and prints medians over the rounds with ratios to direct (and to HAProxy in the same mode).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from agentproc import free_port  # noqa: E402
from proxyhelp import wait_port  # noqa: E402

BULK_SERVER = textwrap.dedent("""
    import socket, sys, threading
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
    block = b"b" * (1 << 20)
    def serve(c):
        line = c.makefile("rb").readline()
        if not line.strip():
            c.close(); return  # a readiness probe
        n = int(line)
        while n > 0:
            k = min(n, len(block)); c.sendall(block[:k] if k < len(block) else block); n -= k
        c.close()
    while True:
        c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
""")

GRPC_SERVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from concurrent.futures import ThreadPoolExecutor
    import grpc
    h = grpc.method_handlers_generic_handler("demo.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"ok:" + req)})
    srv = grpc.server(ThreadPoolExecutor(max_workers=4)); srv.add_generic_rpc_handlers((h,))
    srv.add_insecure_port("127.0.0.1:" + sys.argv[1]); srv.start(); time.sleep(1e6)
""")

GRPC_CLIENT = textwrap.dedent("""
    import statistics, sys, time, grpc
    ch = grpc.insecure_channel(sys.argv[1]); call = ch.unary_unary("/demo.Echo/Call")
    for _ in range(50): call(b"w", timeout=10)
    took, t0, d = [], time.perf_counter(), float(sys.argv[2])
    while time.perf_counter() - t0 < d:
        t = time.perf_counter(); call(b"x", timeout=10); took.append(time.perf_counter() - t)
    print(len(took) / (time.perf_counter() - t0), statistics.median(took) * 1e3, len(took) + 50)
""")


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kw: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(args, **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def wrk(url: str, conns: int, duration: float, close: bool = False) -> dict[str, float]:
    args = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency", url]
    if close:
        args[4:4] = ["-H", "Connection: close"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30)
    out = done.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk {url}: no result: {out} {done.stderr}")
    rate = float(m.group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)

    def lat(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        assert m, out
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    took = re.search(r"requests in ([\d.]+)(ms|s|m),", out)
    seconds = float(took.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[took.group(2)] if took else duration
    return {"rate": rate, "p50_ms": lat("50"), "p99_ms": lat("99"), "errors": bool(errors and errors.group(0)),
            "seconds": seconds}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, from /proc (the figure load disturbs least)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bulk(port: int, mib: int) -> float:
    n = mib << 20
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    buf = bytearray(1 << 20)
    t0 = time.perf_counter()
    s.sendall(b"%d\n" % n)
    got = 0
    while got < n:
        k = s.recv_into(buf)
        if not k:
            raise RuntimeError(f"bulk: short read {got}/{n}")
        got += k
    dt = time.perf_counter() - t0
    s.close()
    return mib / dt


def grpc_rate(target: str, duration: float) -> tuple[float, float, int]:
    """Sequential unary calls on one channel: calls/s, the median call in ms, calls made."""
    out = subprocess.run([sys.executable, "-c", GRPC_CLIENT, target, str(duration)],
                         capture_output=True, text=True, timeout=duration + 60)
    rate, p50, calls = out.stdout.split()
    return float(rate), float(p50), int(calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--bulk-mib", type=int, default=1024)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--haproxy-threads", type=int, default=1,
                    help="HAProxy's nbthread (1: one event loop, like the agent; 0: its default, one per CPU)")
    ap.add_argument("--only", default="", help="comma-separated: ka,close,lat,bulk,grpc")
    ap.add_argument("--baseline", default="",
                    help="a checkout of another revision (e.g. `git archive main | tar -x -C DIR`): its agent runs "
                         "beside this one, measured in the same rounds as 'base tcp', 'base http' and 'base http2' (A/B in one run)")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else {"ka", "close", "lat", "bulk", "grpc"}

    tmp = tempfile.mkdtemp(prefix="softlb-bench-proxy-")
    procs = Procs()
    p = {k: free_port() for k in ("b1", "b2", "bulk", "grpc", "tcp", "http", "http2", "h_tcp", "h_http", "h_bulk",
                                  "base_tcp", "base_http", "base_bulk", "base_http2")}
    try:
        with open(os.path.join(tmp, "backends.cfg"), "w") as f:
            f.write(textwrap.dedent(f"""
                global
                    nbthread 1
                defaults
                    mode http
                    timeout connect 1s
                    timeout client 30s
                    timeout server 30s
                frontend b1
                    bind 127.0.0.1:{p['b1']}
                    http-request return status 200 content-type text/plain string "hello from b1"
                frontend b2
                    bind 127.0.0.1:{p['b2']}
                    http-request return status 200 content-type text/plain string "hello from b2"
            """))
        with open(os.path.join(tmp, "haproxy.cfg"), "w") as f:
            f.write(("global\n    nbthread %d\n" % args.haproxy_threads) if args.haproxy_threads else "")
            f.write(textwrap.dedent(f"""
                defaults
                    timeout connect 1s
                    timeout client 60s
                    timeout server 60s
                listen tcp
                    mode tcp
                    bind 127.0.0.1:{p['h_tcp']}
                    balance roundrobin
                    server b1 127.0.0.1:{p['b1']}
                    server b2 127.0.0.1:{p['b2']}
                listen bulk
                    mode tcp
                    bind 127.0.0.1:{p['h_bulk']}
                    server bulk 127.0.0.1:{p['bulk']}
                listen http
                    mode http
                    bind 127.0.0.1:{p['h_http']}
                    balance roundrobin
                    server b1 127.0.0.1:{p['b1']}
                    server b2 127.0.0.1:{p['b2']}
            """))
        with open(os.path.join(tmp, "catalog.toml"), "w") as f:
            for svc in ("web", "webh"):
                for b in ("b1", "b2"):
                    f.write(f'[[services.{svc}.endpoints]]\nid = "{b}"\naddress = "127.0.0.1"\nport = {p[b]}\n')
            f.write(f'[[services.bulk.endpoints]]\naddress = "127.0.0.1"\nport = {p["bulk"]}\n')
            f.write(f'[[services.g.endpoints]]\naddress = "127.0.0.1"\nport = {p["grpc"]}\n')
        bulk_port = free_port()
        with open(os.path.join(tmp, "agent.toml"), "w") as f:
            for svc, mode, port in (("web", "tcp", p["tcp"]), ("webh", "http", p["http"]),
                                    ("g", "http2", p["http2"]), ("bulk", "tcp", bulk_port)):
                f.write(f'[services.{svc}.proxy]\nlisten = "127.0.0.1:{port}"\nmode = "{mode}"\n')
        procs.start(["haproxy", "-f", os.path.join(tmp, "backends.cfg")])
        haproxy = procs.start(["haproxy", "-f", os.path.join(tmp, "haproxy.cfg")])
        procs.start([sys.executable, "-c", BULK_SERVER, str(p["bulk"])])
        procs.start([sys.executable, "-c", GRPC_SERVER, str(p["grpc"]), ROOT])
        agent_args = ["--catalog-file", os.path.join(tmp, "catalog.toml"), "--listen", "", "--admin", "",
                      "--log-level", "warning"]
        agent = procs.start([sys.executable, "-m", "softlb_agent", "agent", "--config", os.path.join(tmp, "agent.toml"),
                     "--socket", os.path.join(tmp, "s.sock"), *agent_args])
        if args.baseline:
            with open(os.path.join(tmp, "base.toml"), "w") as f:
                for svc, mode, port in (("web", "tcp", p["base_tcp"]), ("webh", "http", p["base_http"]),
                                        ("bulk", "tcp", p["base_bulk"]), ("g", "http2", p["base_http2"])):
                    f.write(f'[services.{svc}.proxy]\nlisten = "127.0.0.1:{port}"\nmode = "{mode}"\n')
            # The baseline's own `agent` and `softlb` packages, ahead of this checkout's.
            run_base = f"import sys; sys.path.insert(0, {os.path.abspath(args.baseline)!r}); from agent.cli import main; main()"
            base = procs.start([sys.executable, "-c", run_base, "agent", "--config", os.path.join(tmp, "base.toml"),
                         "--socket", os.path.join(tmp, "base.sock"), *agent_args])
        for k in ("b1", "b2", "bulk", "grpc", "tcp", "http", "http2", "h_tcp", "h_http", "h_bulk"):
            wait_port(p[k], timeout=30)
        if args.baseline:
            for k in ("base_tcp", "base_http", "base_bulk", "base_http2"):
                wait_port(p[k], timeout=30)
        wait_port(bulk_port, timeout=30)

        http_targets = {"direct": p["b1"], "softlb tcp": p["tcp"], "haproxy tcp": p["h_tcp"],
                        "softlb http": p["http"], "haproxy http": p["h_http"]}
        bulk_targets = {"direct": p["bulk"], "softlb tcp": bulk_port, "haproxy tcp": p["h_bulk"]}
        if args.baseline:
            http_targets.update({"base tcp": p["base_tcp"], "base http": p["base_http"]})
            bulk_targets["base tcp"] = p["base_bulk"]
        results: dict[str, dict[str, list[float]]] = {}
        # Whose CPU a target's requests cost (utime+stime over wrk's request count).
        pids = {"softlb tcp": agent.pid, "softlb http": agent.pid, "haproxy tcp": haproxy.pid,
                "haproxy http": haproxy.pid}
        if args.baseline:
            pids.update({"base tcp": base.pid, "base http": base.pid})

        def add(scenario: str, target: str, value: float) -> None:
            results.setdefault(scenario, {}).setdefault(target, []).append(value)

        def wrk_rate(scenario: str, name: str, url: str, close: bool) -> None:
            pid = pids.get(name)
            c0 = cpu_seconds(pid) if pid else 0.0
            w = wrk(url, 32, args.duration, close=close)
            add(f"{scenario} req/s", name, w["rate"])
            if pid:
                add(f"{scenario} cpu us/req", name, (cpu_seconds(pid) - c0) / (w["rate"] * w["seconds"]) * 1e6)

        for r in range(args.rounds):
            for name, port in http_targets.items():
                url = f"http://127.0.0.1:{port}/"
                if "ka" in only:
                    wrk_rate("ka", name, url, close=False)
                if "close" in only:
                    wrk_rate("close", name, url, close=True)
                if "lat" in only:
                    w = wrk(url, 1, args.duration)
                    add("lat p50 ms", name, w["p50_ms"])
                    add("lat p99 ms", name, w["p99_ms"])
            if "bulk" in only:
                for name, port in bulk_targets.items():
                    pid = pids.get(name)
                    c0 = cpu_seconds(pid) if pid else 0.0
                    add("bulk MiB/s", name, bulk(port, args.bulk_mib))
                    if pid:  # the proxy's own CPU per GiB moved (utime+stime)
                        add("bulk cpu ms/GiB", name, (cpu_seconds(pid) - c0) / (args.bulk_mib / 1024) * 1e3)
            if "grpc" in only:
                grpc_targets = [("direct", p["grpc"], None), ("softlb http2", p["http2"], agent)]
                if args.baseline:
                    grpc_targets.append(("base http2", p["base_http2"], base))
                for name, port, proc in grpc_targets:
                    cpu0 = cpu_seconds(proc.pid) if proc else 0.0
                    rate, p50, calls = grpc_rate(f"127.0.0.1:{port}", args.duration)
                    add("grpc calls/s", name, rate)
                    add("lat grpc p50 ms", name, p50)
                    if proc:  # the agent's CPU per call: the figure load disturbs least
                        add("grpc agent CPU ms/call", name, (cpu_seconds(proc.pid) - cpu0) / calls * 1e3)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

        med = {s: {t: statistics.median(v) for t, v in d.items()} for s, d in results.items()}
        if args.json:
            print(json.dumps({"medians": med, "runs": results}, indent=2))
            return
        print(f"median of {args.rounds} rounds, {args.duration:g}s each (bulk {args.bulk_mib} MiB); "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; haproxy nbthread "
              f"{args.haproxy_threads or 'default'}")
        for s, d in med.items():
            print(f"\n{s}")
            direct = d.get("direct")
            for t, v in d.items():
                extra = ""
                if direct and t != "direct":
                    if s.startswith("lat"):
                        extra = f"  +{v - direct:.3f} ms over direct"
                    else:
                        extra = f"  {v / direct:.2f} of direct"
                    mode = t.split()[-1]
                    h = d.get(f"haproxy {mode}")
                    if t.startswith(("softlb", "base")) and h and not s.startswith("lat"):
                        extra += f", {v / h:.2f} of haproxy {mode}"
                    b = d.get(f"base {mode}")
                    if t.startswith("softlb") and b and not s.startswith("lat"):
                        extra += f", {v / b:.2f} of base"
                print(f"  {t:14} {v:12.3f}{extra}")
    finally:
        procs.stop()


if __name__ == "__main__":
    main()
