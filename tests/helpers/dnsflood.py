"""A UDP DNS query flood, as a separate process (tests/agent/test_dns.py, bench/dns.py).

    python -m tests.helpers.dnsflood PORT SECONDS [NAME] [--garbage | --unique] [--tcp]

Sends `NAME A` queries (junk datagrams with --garbage; a new unknown name each time with
--unique, so no answer can be reused) to 127.0.0.1:PORT as fast as one
process can for SECONDS, reading whatever answers come back so its own receive buffer never
fills, then prints one JSON line: {"sent": N, "answered": M}. It always stops on its own
after SECONDS; callers still stop it by pid if it outlives them. With --tcp the queries go
over TCP_CONNECTIONS connections instead, each keeping PIPELINE questions in flight.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def query(name: str, qid: int = 0x4242) -> bytes:
    header = qid.to_bytes(2, "big") + b"\x01\x00" + b"\x00\x01" + b"\x00\x00" * 3  # RD, 1 question
    qname = b"".join(bytes((len(p),)) + p.encode() for p in name.strip(".").split(".")) + b"\x00"
    return header + qname + b"\x00\x01\x00\x01"  # A, IN


def flood(port: int, seconds: float, name: str = "web.service.softlb", garbage: bool = False,
          unique: bool = False) -> dict[str, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.connect(("127.0.0.1", port))
    if garbage:
        payloads = [os.urandom(n) for n in (3, 12, 40, 300)]
    elif unique:
        payloads = [query(f"u{os.urandom(6).hex()}.service.softlb", i & 0xFFFF) for i in range(20000)]
    else:
        payloads = [query(name, i) for i in range(1, 64)]
    sent = answered = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for p in payloads:
            try:
                s.send(p)
                sent += 1
            except (BlockingIOError, ConnectionRefusedError):
                break
        while True:
            try:
                s.recv(65535)
                answered += 1
            except (BlockingIOError, ConnectionRefusedError):
                break
    s.close()
    return {"sent": sent, "answered": answered}


TCP_CONNECTIONS = 16
PIPELINE = 8


def flood_tcp(port: int, seconds: float, name: str = "web.service.softlb", unique: bool = False) -> dict[str, int]:
    conns = []
    for _ in range(TCP_CONNECTIONS):
        c = socket.create_connection(("127.0.0.1", port), timeout=2)
        c.setblocking(False)
        conns.append([c, 0, b""])  # socket, questions in flight, unread bytes
    sent = answered = 0
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        for conn in conns:
            c, inflight, buf = conn
            try:
                buf += c.recv(65535)
            except BlockingIOError:
                pass
            while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                buf = buf[2 + int.from_bytes(buf[:2], "big"):]
                inflight -= 1
                answered += 1
            batch = []
            while inflight < PIPELINE:
                i += 1
                q = query(f"u{i}x{os.getpid()}.service.softlb" if unique else name, i & 0xFFFF)
                batch.append(len(q).to_bytes(2, "big") + q)
                inflight += 1
            if batch:
                c.setblocking(True)  # a few hundred bytes: the socket buffer takes them at once
                c.sendall(b"".join(batch))
                c.setblocking(False)
                sent += len(batch)
            conn[1], conn[2] = inflight, buf
        time.sleep(0)
    for c, *_ in conns:
        c.close()
    return {"sent": sent, "answered": answered}


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--tcp" in sys.argv:
        out = flood_tcp(int(args[0]), float(args[1]), *(args[2:3]), unique="--unique" in sys.argv)
    else:
        out = flood(int(args[0]), float(args[1]), *(args[2:3]), garbage="--garbage" in sys.argv,
                    unique="--unique" in sys.argv)
    print(json.dumps(out), flush=True)
