"""Benchmark: what a relay's wakeups cost in trio, a task per connection against one epoll
reactor task per listener (as agent/proxy/relay.py does for tcp), for a sequential caller.

    .venv/bin/python bench/trio_wake.py [--seconds 3] [--rounds 5]

A client process sends 64 bytes and waits for them back; the relay (trio, in this process)
forwards them to an echo process and the echo back: two wakeups and two writes per round
trip, the shape of a proxied unary call without any protocol work. Designs, rounds
interleaved A/B/A/B: `tasks` (a reader task per socket, `wait_readable` then `read`, as
agent/proxy/http2.py does), `reactor` (the sockets registered once, edge-triggered, in an
epoll set of the relay's own that one task waits on). Prints the median round trip of
each and the relay's CPU per round trip (/proc), medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import subprocess
import sys
import textwrap
import time

import trio

CLIENT = textwrap.dedent("""
    import socket, statistics, sys, time
    s = socket.socket(fileno=int(sys.argv[1])); d = float(sys.argv[2]); msg = b"x" * 64
    for _ in range(200):
        s.sendall(msg); s.recv(64)
    took, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < d:
        t = time.perf_counter(); s.sendall(msg); s.recv(64); took.append(time.perf_counter() - t)
    s.sendall(b"")
    print(statistics.median(took) * 1e6, len(took) + 200)
""")
ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(fileno=int(sys.argv[1]))
    while True:
        b = s.recv(65536)
        if not b:
            break
        s.sendall(b)
""")


def cpu() -> float:
    t = os.times()
    return t.user + t.system


async def tasks(c: socket.socket, u: socket.socket) -> None:
    async def way(src: socket.socket, dst: socket.socket, done: trio.CancelScope) -> None:
        while True:
            await trio.lowlevel.wait_readable(src)
            try:
                b = os.read(src.fileno(), 65536)
            except BlockingIOError:
                continue
            if not b:
                done.cancel()
                return
            os.write(dst.fileno(), b)

    async with trio.open_nursery() as n:
        n.start_soon(way, c, u, n.cancel_scope)
        n.start_soon(way, u, c, n.cancel_scope)


async def reactor(c: socket.socket, u: socket.socket) -> None:
    ep = select.epoll()
    peer = {c.fileno(): u.fileno(), u.fileno(): c.fileno()}
    for s in (c, u):
        ep.register(s, select.EPOLLIN | select.EPOLLET)
    try:
        while True:
            await trio.lowlevel.wait_readable(ep)
            for fd, _ in ep.poll(0, 64):
                while True:  # edge-triggered: read until EAGAIN
                    try:
                        b = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if not b:
                        return
                    os.write(peer[fd], b)
    finally:
        trio.lowlevel.notify_closing(ep)
        ep.close()


def one(design: str, seconds: float) -> tuple[float, float]:
    c_ours, c_theirs = socket.socketpair()
    u_ours, u_theirs = socket.socketpair()
    for s in (c_ours, u_ours):
        s.setblocking(False)
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(u_theirs.fileno())], pass_fds=[u_theirs.fileno()])
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(c_theirs.fileno()), str(seconds)],
                              pass_fds=[c_theirs.fileno()], stdout=subprocess.PIPE, text=True)
    c_theirs.close()
    u_theirs.close()
    t0 = cpu()
    try:
        trio.run(tasks if design == "tasks" else reactor, c_ours, u_ours)
        used = cpu() - t0
        p50, n = client.communicate(timeout=seconds + 30)[0].split()
    finally:
        u_ours.close()
        c_ours.close()
        echo.wait(10)
        client.wait(10)
    return float(p50), used / int(n) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    got: dict[str, list[tuple[float, float]]] = {"tasks": [], "reactor": []}
    for _ in range(args.rounds):
        for d in got:
            got[d].append(one(d, args.seconds))
    print(f"{args.rounds} rounds of {args.seconds:g} s, load {os.getloadavg()[0]:.1f}")
    for d, v in got.items():
        print(f"  {d:8} round trip p50 {statistics.median(x[0] for x in v):6.1f} µs, "
              f"relay CPU {statistics.median(x[1] for x in v):5.1f} µs per round trip")


if __name__ == "__main__":
    main()
