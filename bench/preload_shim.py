"""Benchmark: the connect-time shim (clients/c/build/libsoftlb-preload.so) beside direct
connections: bulk throughput, and the latency it adds to connect().

    .venv/bin/python bench/preload_shim.py [--runs 7] [--mib 512] [--connects 1000] [--json]

Starts a real agent (temporary socket, loopback only) serving two services: `bulk` (a
source process that writes --mib MiB to every connection and closes) and `tick` (a server
that accepts and closes). Clients are short Python processes:

  throughput   one connection reads everything; timed from after connect() to EOF.
               direct      no LD_PRELOAD, connects to 127.0.0.1:PORT
               passthru    LD_PRELOAD, connects to 127.0.0.1:PORT (not a service: untouched)
               shim        LD_PRELOAD, connects to bulk.service.softlb (a pick, then direct)
               proxy       the agent's loopback proxy in tcp mode (`[services.bulk.proxy]`),
                           when this agent has one (else left out, said on stderr)
               Rounds run every path once, rotating which goes first; each figure is the
               median of --runs rounds.
  connect      one process does --connects connect()+close() in a loop, each connect timed
               (getaddrinfo once, outside the loop); p50/p99 for direct and shim, and
               the difference (the agent round trip a pick costs).

Every process started here is stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from agentproc import AgentProcess, endpoint_toml, free_port  # noqa: E402

SHIM = os.path.join(ROOT, "clients", "c", "build", "libsoftlb-preload.so")
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

SOURCE = r"""
import socket, sys, threading
mib, mode = int(sys.argv[1]), sys.argv[2]
chunk = memoryview(b'\0' * (4 << 20))
l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(512)
print(l.getsockname()[1], flush=True)
def serve(c):
    try:
        if mode == 'bulk':
            for _ in range(mib // 4):
                c.sendall(chunk)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

READER = r"""
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
ai = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0]
s = socket.socket(ai[0], ai[1]); s.connect(ai[4])
buf = bytearray(1 << 20); n = 0
t0 = time.perf_counter()
while True:
    k = s.recv_into(buf)
    if not k: break
    n += k
print(n, time.perf_counter() - t0)
"""

CONNECTS = r"""
import socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ai = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0]
out = []
for _ in range(count):
    s = socket.socket(ai[0], ai[1])
    t0 = time.perf_counter(); s.connect(ai[4]); out.append(time.perf_counter() - t0)
    s.close()
out.sort()
print(out[len(out) // 2], out[int(len(out) * 0.99)])
"""


def start_server(mode: str, mib: int) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen([PY, "-c", SOURCE, str(mib), mode], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    return p, int(p.stdout.readline())


def run_client(code: str, args: list[str], shim: bool, sock: str) -> list[float]:
    env = {**os.environ, "SOFTLB_SOCKET": sock}
    if shim:
        env["LD_PRELOAD"] = SHIM
    r = subprocess.run([PY, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return [float(x) for x in r.stdout.split()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--connects", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = subprocess.run(["make", "-s", "--no-print-directory", "-C", os.path.join(ROOT, "clients", "c"), "preload"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr, file=sys.stderr)
        return 2
    procs: list[subprocess.Popen[str]] = []
    agent = None
    try:
        bulk, bulk_port = start_server("bulk", a.mib)
        procs.append(bulk)
        tick, tick_port = start_server("tick", 0)
        procs.append(tick)
        tmp = tempfile.mkdtemp(prefix="softlb-bench-shim-")
        catalog = endpoint_toml("bulk", "127.0.0.1", bulk_port, id="bulk-1") + \
            endpoint_toml("tick", "127.0.0.1", tick_port, id="tick-1")
        kinds = {
            "direct": (False, "127.0.0.1", bulk_port),
            "passthru": (True, "127.0.0.1", bulk_port),
            "shim": (True, "bulk.service.softlb", bulk_port),
        }
        proxy_port = free_port()
        agent = AgentProcess(tmp, catalog, f'[services.bulk.proxy]\nlisten = "127.0.0.1:{proxy_port}"\nmode = "tcp"\n',
                             admin=False)
        try:
            agent.start()
            kinds["proxy"] = (False, "127.0.0.1", proxy_port)
        except RuntimeError:
            print("this agent has no loopback proxy: the proxy column is left out", file=sys.stderr)
            agent = AgentProcess(tempfile.mkdtemp(prefix="softlb-bench-shim-"), catalog, admin=False).start()
        gbps: dict[str, list[float]] = {k: [] for k in kinds}
        names = list(kinds)
        for rnd in range(a.runs):
            # Rotate who goes first: a position in the round must not favour anyone.
            for k in names[rnd % len(names):] + names[:rnd % len(names)]:
                shim, host, port = kinds[k]
                n, secs = run_client(READER, [host, str(port)], shim, agent.socket)
                assert n == a.mib << 20, n
                gbps[k].append(n / secs / 1e9)
        lat: dict[str, list[list[float]]] = {"direct": [], "shim": []}
        for _ in range(3):
            lat["direct"].append(run_client(CONNECTS, ["127.0.0.1", str(tick_port), str(a.connects)], False, agent.socket))
            lat["shim"].append(run_client(CONNECTS, ["tick.service.softlb", str(tick_port), str(a.connects)], True, agent.socket))
    finally:
        if agent is not None:
            agent.stop()
        for p in procs:
            p.kill()
            p.wait()
    med = {k: statistics.median(v) for k, v in gbps.items()}
    p50 = {k: statistics.median(x[0] for x in v) * 1e6 for k, v in lat.items()}
    p99 = {k: statistics.median(x[1] for x in v) * 1e6 for k, v in lat.items()}
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "mib": a.mib, "runs": a.runs,
        "throughput_gbytes_s": med,
        "ratio_shim_vs_direct": med["shim"] / med["direct"],
        "ratio_passthru_vs_direct": med["passthru"] / med["direct"],
        # Each round's own ratio (same minute, same load), then the median: drift cancels.
        "paired_ratio_shim": statistics.median(s / d for s, d in zip(gbps["shim"], gbps["direct"])),
        "paired_ratio_passthru": statistics.median(s / d for s, d in zip(gbps["passthru"], gbps["direct"])),
        **({"ratio_proxy_vs_direct": med["proxy"] / med["direct"],
            "paired_ratio_proxy": statistics.median(s / d for s, d in zip(gbps["proxy"], gbps["direct"]))}
           if "proxy" in med else {}),
        "connect_us": {"p50": p50, "p99": p99,
                       "added_p50": p50["shim"] - p50["direct"], "added_p99": p99["shim"] - p99["direct"]},
    }
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"machine: {out['machine']}; {a.runs} interleaved runs of {a.mib} MiB, medians")
        for k, v in med.items():
            paired = out.get(f"paired_ratio_{k}", 1.0)
            print(f"  {k:9s} {v:6.2f} GB/s   ratio of medians {v / med['direct']:.3f}   median paired ratio {paired:.3f}")
        print(f"connect(): direct p50 {p50['direct']:.0f} µs p99 {p99['direct']:.0f} µs; "
              f"shim p50 {p50['shim']:.0f} µs p99 {p99['shim']:.0f} µs; "
              f"added p50 {out['connect_us']['added_p50']:.0f} µs p99 {out['connect_us']['added_p99']:.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
