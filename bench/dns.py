"""Benchmark: the DNS front end, and a UDP query flood beside a socket caller.

    .venv/bin/python bench/dns.py [--runs 3] [--window 2] [--json]

Starts a real agent subprocess (file catalog, 3-endpoint round-robin `web`, `--dns` on a free
loopback port), stops it by pid at the end. Measures, in ONE run, phases interleaved
(quiet, flood, quiet, flood, ...) so machine noise hits them alike; each figure is the median
over --runs rounds:

  dns_a / dns_srv      one UDP query at a time (a plain socket, dnspython-built queries):
                       queries/s, p50, p99 of the round trip
  bystander_*          a socket caller (softlb_client.Client over the Unix socket) resolving
                       `web` back to back for --window seconds: p50, p99, calls/s, with
                       the DNS port quiet, or flooded by one process (tests/helpers/dnsflood.py)
                       sending as fast as it can:
                         repeat   the same A query (answers reuse dnspython's rendering)
                         unique   a new unknown name per query (each parsed and rendered: the
                                  front end's most expensive path)
                         garbage  random bytes (FORMERR or dropped)
                         tcp-unique  16 TCP connections, 8 new names in flight on each
  flood answered/s     what the flooded front end answered meanwhile

The issue's bound: the bystander's p99 within 5 ms while the DNS port is flooded.

With --ab, only the new-name UDP flood, against this agent and against one whose UDP loop
has no budget (answers until its socket buffer is empty), the two interleaved in one run;
`timeouts` counts the caller's calls that hit the client's 1 s timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This file is bench/dns.py: with bench/ first on the path (Python puts the script's
# directory there), `import dns` would find this file instead of dnspython.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.join(ROOT, "bench")]
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from agentproc import free_port  # noqa: E402  (tests/ is on the path just above)
from tests.helpers.dnsflood import query  # noqa: E402

CATALOG = "".join(
    f'[[services.web.endpoints]]\naddress = "127.0.0.{i}"\nport = {18080 + i}\n' for i in range(1, 4)
)
FLOODS = ("repeat", "unique", "garbage", "tcp-unique")


#: The agent with the UDP loop's budget taken away (--ab): it answers until its socket
#: buffer is empty, as a loop without a budget would.
NO_BUDGET = ("import sys, softlb_agent.dns as d; d.UDP_BUDGET = 10**9; d.UDP_SLICE = 1e9; "
             "from softlb_agent.cli import main; sys.exit(main())")


def start_agent(tmp: str, budget: bool = True) -> tuple[subprocess.Popen[bytes], str, int]:
    from softlb_client import Client

    cat = os.path.join(tmp, "catalog.toml")
    with open(cat, "w") as f:
        f.write(CATALOG)
    sock = os.path.join(tmp, "softlb.sock")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, *(["-m", "softlb_agent"] if budget else ["-c", NO_BUDGET]), "agent", "--catalog-file", cat, "--socket", sock,
         "--listen", "", "--admin", "", "--dns", f"127.0.0.1:{port}", "--log-level", "warning"],
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            with Client(socket_path=sock, timeout=0.5) as c:
                c.hello()
            return proc, sock, port
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("agent did not start")
            time.sleep(0.05)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def dns_round_trips(port: int, rdtype: str, seconds: float) -> dict[str, float]:
    import dns.message

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    s.connect(("127.0.0.1", port))
    wire = dns.message.make_query("web.service.softlb", rdtype).to_wire()
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        s.send(wire)
        s.recv(65535)
        lat.append(time.perf_counter() - t)
    s.close()
    return {"per_s": len(lat) / seconds, "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3}


def bystander(sock: str, seconds: float) -> dict[str, float]:
    from softlb_client import Client, SoftLBError

    lat = []
    timeouts = 0
    with Client(socket_path=sock, timeout=1.0) as c:
        try:
            c.resolve("web", lease=False)  # connects; untimed
        except SoftLBError:
            timeouts += 1
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                c.resolve("web", lease=False)
            except SoftLBError:  # the 1 s call timeout: counted, and its wait is in the figures
                timeouts += 1
            lat.append(time.perf_counter() - t)
    return {"per_s": len(lat) / seconds, "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
            "max_ms": max(lat) * 1e3, "timeouts": timeouts}


def flooded(sock: str, port: int, kind: str, seconds: float) -> dict[str, float]:
    args = [sys.executable, "-m", "tests.helpers.dnsflood", str(port), str(seconds + 0.5)]
    if kind != "repeat":
        args += [f"--{k}" for k in kind.split("-")]
    flooder = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.25)  # the flood is under way and the agent's buffer full
        out = bystander(sock, seconds)
        flood = json.loads(flooder.communicate(timeout=seconds + 10)[0])
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait(timeout=5)
    out["flood_answered_per_s"] = flood["answered"] / (seconds + 0.5)
    out["flood_sent_per_s"] = flood["sent"] / (seconds + 0.5)
    time.sleep(0.5)  # let the agent drain what the flood left queued
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--window", type=float, default=2.0, help="seconds per measured phase")
    ap.add_argument("--ab", action="store_true",
                    help="instead: the new-name UDP flood against this agent and one without the UDP budget, interleaved")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.mkdir(os.path.join(tmp, "a"))
        agents = {"": start_agent(os.path.join(tmp, "a"))}
        if args.ab:
            os.mkdir(os.path.join(tmp, "b"))
            agents["no_budget_"] = start_agent(os.path.join(tmp, "b"), budget=False)
        rounds: list[dict[str, dict[str, float]]] = []
        pairs: list[tuple[str, str]] = []
        try:
            for _ in range(args.runs):
                r: dict[str, dict[str, float]] = {}
                if args.ab:
                    for variant, (_proc, sock, port) in agents.items():
                        name = variant or "budget_"
                        r[f"{name}quiet"] = bystander(sock, args.window)
                        r[f"{name}flood_unique"] = flooded(sock, port, "unique", args.window)
                        pairs.append((f"{name}quiet", f"{name}flood_unique"))
                else:
                    _proc, sock, port = agents[""]
                    r["dns_a"] = dns_round_trips(port, "A", args.window / 2)
                    r["dns_srv"] = dns_round_trips(port, "SRV", args.window / 2)
                    for kind in FLOODS:  # quiet, flood, quiet, flood...: the ratio is per pair
                        r[f"bystander_quiet_before_{kind}"] = bystander(sock, args.window)
                        r[f"bystander_flood_{kind}"] = flooded(sock, port, kind, args.window)
                        pairs.append((f"bystander_quiet_before_{kind}", f"bystander_flood_{kind}"))
                rounds.append(r)
        finally:
            for proc, _sock, _port in agents.values():
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
    med = {name: {k: statistics.median(r[name][k] for r in rounds) for k in rounds[0][name]} for name in rounds[0]}
    for quiet, flood in dict.fromkeys(pairs):
        ratios = [r[flood]["p99_ms"] / r[quiet]["p99_ms"] for r in rounds]
        med[flood]["p99_ratio_to_quiet"] = statistics.median(ratios)
    if args.json:
        print(json.dumps({"machine": platform.platform(), "runs": args.runs, "median": med}, indent=1))
        return
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"median of {args.runs} runs, {args.window}s windows")
    for name, v in med.items():
        print(f"{name:34s} " + "  ".join(f"{k}={x:,.2f}" for k, x in v.items()))


if __name__ == "__main__":
    main()
