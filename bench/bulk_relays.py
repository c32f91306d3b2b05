"""Benchmark: one bulk transfer direct and through three relays, with each process's CPU.

    .venv/bin/python bench/bulk_relays.py [--rounds 7] [--mib 1024] [--json]

Why: issue 11 asks the tcp proxy for >= 0.6 of direct on a 1 GiB transfer. This puts the
agent beside the least a relay in user space can do and beside a relay in the kernel, on
the same machine in the same rounds, so the figure can be read as the machine's or the
code's:
  direct   the client reads from the bulk server;
  agent    through this checkout's agent (a tcp listener: splice(2) through a pipe, driven
           by trio);
  thread   a minimal relay: a blocking splice loop per direction in a thread of its own, no
           event loop, 1 MiB pipes (nothing on its path but the two splice calls);
  sockmap  an SK_SKB verdict program redirecting each socket's bytes to its peer's send
           path (Cilium-style; the agent never sees them). Needs CAP_BPF and CAP_NET_ADMIN
           (root) and a kernel with sockmap; otherwise skipped, and the reason printed.
Each round runs every target once in turn. Printed: medians of MiB/s and of the ratio to
direct, each process's CPU per GiB (utime+stime from /proc, the client's from getrusage),
and how many reads the client needed per GiB. Everything runs on loopback and every
process started is stopped by its pid. Exit status 0, or 1 when a target failed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from agentproc import free_port  # noqa: E402
from proxy import BULK_SERVER, Procs, cpu_seconds  # noqa: E402
from proxyhelp import wait_port  # noqa: E402

THREAD_RELAY = textwrap.dedent("""
    import fcntl, os, socket, sys, threading
    up, port = int(sys.argv[1]), int(sys.argv[2])
    CHUNK = 1 << 20
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port)); ls.listen(64)
    def way(a, b):
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, 1031, CHUNK)  # F_SETPIPE_SZ
        except OSError:
            pass
        try:
            while True:
                n = os.splice(a.fileno(), w, CHUNK)
                if n == 0:
                    break
                while n:
                    n -= os.splice(r, b.fileno(), n)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            os.close(r); os.close(w)
    def serve(c):
        try:
            u = socket.create_connection(("127.0.0.1", up))
        except OSError:
            c.close(); return
        for s in (c, u):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = threading.Thread(target=way, args=(c, u)); t.start(); way(u, c); t.join()
        c.close(); u.close()
    while True:
        c, _ = ls.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
""")

# The verdict program, hand-assembled (no compiler here): key = (local port, remote port as
# the kernel presents it in __sk_buff: network order, shifted left 16 on little-endian);
# a hash map gives the peer's slot in the sockmap; bpf_sk_redirect_map sends the bytes out
# of the peer. Sockets with no entry pass.
SOCKMAP_RELAY = textwrap.dedent("""
    import ctypes, os, select, socket, struct, sys, threading
    libc = ctypes.CDLL(None, use_errno=True)
    def bpf(cmd, *fields, fmt):
        buf = ctypes.create_string_buffer(struct.pack(fmt, *fields).ljust(128, b"\\0"), 128)
        r = libc.syscall(321, cmd, buf, 128)  # __NR_bpf on x86_64
        if r < 0:
            e = ctypes.get_errno(); raise OSError(e, f"bpf({cmd}): {os.strerror(e)}")
        return r
    keep = []
    def ptr(b):
        s = ctypes.create_string_buffer(b, len(b)); keep.append(s); return ctypes.addressof(s)
    def update(fd, k, v):
        bpf(2, fd, 0, ptr(k), ptr(v), 0, fmt="IIQQQ"); keep.clear()
    def delete(fd, k):
        try:
            bpf(3, fd, 0, ptr(k), fmt="IIQ")
        except OSError:
            pass
        keep.clear()
    def ins(code, dst=0, src=0, off=0, imm=0):
        return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)
    def ld_map(dst, fd):
        return ins(0x18, dst, 1, 0, fd) + ins(0)
    peers = bpf(0, 1, 8, 4, 65536, fmt="IIII")      # HASH (lport, rport) -> peer slot
    slots = bpf(0, 15, 4, 4, 65536, fmt="IIII")     # SOCKMAP slot -> socket
    prog = b"".join([
        ins(0xbf, 6, 1), ins(0x61, 2, 6, 136), ins(0x63, 10, 2, -8),   # key.lport
        ins(0x61, 2, 6, 132), ins(0x63, 10, 2, -4),                    # key.rport
        ld_map(1, peers), ins(0xbf, 2, 10), ins(0x07, 2, 0, 0, -8), ins(0x85, imm=1),
        ins(0x15, 0, 0, 7, 0),                                         # no peer: pass
        ins(0x61, 3, 0, 0), ins(0xbf, 1, 6), ld_map(2, slots), ins(0xb7, 4), ins(0x85, imm=52), ins(0x95),
        ins(0xb7, 0, 0, 0, 1), ins(0x95)])
    lic = b"GPL\\0"
    pfd = bpf(5, 14, len(prog) // 8, ptr(prog), ptr(lic), fmt="IIQQ")  # SK_SKB
    bpf(8, slots, pfd, 38, 0, fmt="IIII")  # attach as BPF_SK_SKB_VERDICT
    keep.clear()
    up, port = int(sys.argv[1]), int(sys.argv[2])
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port)); ls.listen(64)
    lock = threading.Lock(); free = list(range(0, 65536, 2))
    def key(s):
        return struct.pack("II", s.getsockname()[1], socket.htons(s.getpeername()[1]) << 16)
    def serve(c):
        try:
            u = socket.create_connection(("127.0.0.1", up))
        except OSError:
            c.close(); return
        with lock:
            i = free.pop()
        keys = []
        try:
            keys = [key(c), key(u)]
            update(peers, keys[0], struct.pack("I", i + 1)); update(peers, keys[1], struct.pack("I", i))
            update(slots, struct.pack("I", i), struct.pack("I", c.fileno()))
            update(slots, struct.pack("I", i + 1), struct.pack("I", u.fileno()))
            for a, b in ((c, u), (u, c)):  # what came before the sockets joined the map
                a.setblocking(False)
                try:
                    d = a.recv(1 << 16)
                    if d:
                        b.sendall(d)
                except BlockingIOError:
                    pass
            # The bench's client hangs up once it has every byte; the server's end of
            # stream is not passed on (the kernel may still hold redirected bytes).
            p = select.poll(); p.register(c, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            p.poll(120_000)
        except OSError:
            pass  # a readiness probe gone before it joined the map
        finally:
            for k in keys:
                delete(peers, k)
            for k in (i, i + 1):
                delete(slots, struct.pack("I", k))
            c.close(); u.close()
            with lock:
                free.append(i)
    while True:
        c, _ = ls.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
""")


def listening(port: int, proc: object, timeout: float = 30.0) -> bool:
    """Whether `proc` came to accept on `port` (False as soon as it exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:  # type: ignore[attr-defined]
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def transfer(port: int, mib: int) -> tuple[float, float, int]:
    """MiB/s, the client's CPU seconds, and its reads, for one transfer of `mib` MiB."""
    n = mib << 20
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    buf = bytearray(1 << 20)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    s.sendall(b"%d\n" % n)
    got = reads = 0
    while got < n:
        k = s.recv_into(buf)
        if not k:
            raise RuntimeError(f"short read {got}/{n}")
        got += k
        reads += 1
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    s.close()
    return mib / dt, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, reads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--mib", type=int, default=1024, help="MiB per transfer")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="softlb-bench-bulk-")
    procs = Procs()
    up = free_port()
    ports = {"agent": free_port(), "thread": free_port(), "sockmap": free_port()}
    skipped: dict[str, str] = {}
    try:
        server = procs.start([sys.executable, "-c", BULK_SERVER, str(up)])
        with open(os.path.join(tmp, "catalog.toml"), "w") as f:
            f.write(f'[[services.bulk.endpoints]]\naddress = "127.0.0.1"\nport = {up}\n')
        with open(os.path.join(tmp, "agent.toml"), "w") as f:
            f.write(f'[services.bulk.proxy]\nlisten = "127.0.0.1:{ports["agent"]}"\nmode = "tcp"\n')
        relays = {
            "agent": procs.start([sys.executable, "-m", "softlb_agent", "agent", "--config",
                                  os.path.join(tmp, "agent.toml"), "--socket", os.path.join(tmp, "s.sock"),
                                  "--catalog-file", os.path.join(tmp, "catalog.toml"), "--listen", "",
                                  "--admin", "", "--log-level", "warning"]),
            "thread": procs.start([sys.executable, "-c", THREAD_RELAY, str(up), str(ports["thread"])]),
            "sockmap": procs.start([sys.executable, "-c", SOCKMAP_RELAY, str(up), str(ports["sockmap"])],
                                   stderr=open(os.path.join(tmp, "sockmap.err"), "wb")),
        }
        wait_port(up, timeout=30)
        for name in ("agent", "thread", "sockmap"):
            if not listening(ports[name], relays[name]):
                if name != "sockmap":
                    raise RuntimeError(f"{name} did not start")
                relays.pop(name)
                with open(os.path.join(tmp, "sockmap.err"), errors="replace") as f:
                    skipped[name] = (f.read().strip().splitlines() or ["did not start"])[-1]
        targets = {"direct": (up, None), **{n: (ports[n], p) for n, p in relays.items()}}
        runs: dict[str, list[dict[str, float]]] = {n: [] for n in targets}
        failed = False
        for r in range(args.rounds):
            for name, (port, proc) in targets.items():
                s0 = cpu_seconds(server.pid)
                p0 = cpu_seconds(proc.pid) if proc else 0.0
                try:
                    rate, client_cpu, reads = transfer(port, args.mib)
                except (OSError, RuntimeError) as e:
                    print(f"{name}: {e}", file=sys.stderr)
                    failed = True
                    continue
                gib = args.mib / 1024
                runs[name].append({"mib_s": rate, "server_ms": (cpu_seconds(server.pid) - s0) / gib * 1e3,
                                   "relay_ms": ((cpu_seconds(proc.pid) - p0) / gib * 1e3) if proc else 0.0,
                                   "client_ms": client_cpu / gib * 1e3, "reads": reads / gib})
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        direct = statistics.median(x["mib_s"] for x in runs["direct"])
        med = {n: {k: statistics.median(x[k] for x in xs) for k in xs[0]} for n, xs in runs.items() if xs}
        for n, xs in runs.items():
            if xs:
                med[n]["of_direct"] = med[n]["mib_s"] / direct
                med[n]["round_ratios"] = [round(x["mib_s"] / direct, 2) for x in xs]  # type: ignore[assignment]
        if args.json:
            print(json.dumps({"medians": med, "runs": runs, "skipped": skipped}, indent=2))
            return 1 if failed else 0
        print(f"median of {args.rounds} rounds, {args.mib} MiB each; {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}")
        print(f"\n{'':8} {'MiB/s':>7} {'of direct':>9}   CPU ms/GiB: {'server':>6} {'relay':>6} {'client':>6} "
              f"{'sum':>5}   {'reads/GiB':>9}   each round, of direct")
        for n, m in med.items():
            total = m["server_ms"] + m["relay_ms"] + m["client_ms"]
            print(f"{n:8} {m['mib_s']:7.0f} {m['of_direct']:9.2f}   {'':12}{m['server_ms']:6.0f} "
                  f"{m['relay_ms']:6.0f} {m['client_ms']:6.0f} {total:5.0f}   {m['reads']:9.0f}   "
                  f"{' '.join(f'{x:.2f}' for x in m['round_ratios'])}")  # type: ignore[union-attr]
        for n, why in skipped.items():
            print(f"{n}: skipped: {why}")
        return 1 if failed else 0
    finally:
        procs.stop()


if __name__ == "__main__":
    sys.exit(main())
