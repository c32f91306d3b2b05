"""Who is on the other end of a Unix-socket connection (agent/listeners.py Peer.of): one
Peer per process, shared by its connections, so a process opening connections as fast as
it can does not make one per connection (issue 10, the connection flood)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from softlb_agent import listeners
from softlb_agent.listeners import Peer


def _accepted_from_child(path: str, server: socket.socket) -> tuple[socket.socket, subprocess.Popen]:
    child = subprocess.Popen([sys.executable, "-c", (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); sys.stdin.read()"), path],
        stdin=subprocess.PIPE)
    server.settimeout(10)
    conn, _ = server.accept()
    return conn, child


def test_connections_of_one_process_share_one_peer_and_another_process_has_its_own(tmp_path) -> None:
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    mine = [socket.socket(socket.AF_UNIX) for _ in range(2)]
    child = None
    try:
        for c in mine:
            c.connect(path)
        a, _ = server.accept()
        b, _ = server.accept()
        pa, pb = Peer.of(a), Peer.of(b)
        assert pa is pb
        assert (pa.pid, pa.uid, pa.gid) == (os.getpid(), os.geteuid(), os.getegid())
        assert pa.source == f"{os.geteuid()}:{os.getpid()}" and pa.bucket == f"uid:{os.geteuid()}"
        other, child = _accepted_from_child(path, server)
        po = Peer.of(other, socket.AF_UNIX)
        assert po.pid == child.pid and po is not pa and po.source != pa.source
        for s in (a, b, other):
            s.close()
    finally:
        if child is not None:
            child.stdin.close()
            child.wait(10)
        for c in mine:
            c.close()
        server.close()


def test_the_shared_peers_are_bounded_and_stay_right_when_emptied(monkeypatch) -> None:
    monkeypatch.setattr(listeners, "_UNIX_PEERS_MAX", 2)
    monkeypatch.setattr(listeners, "_unix_peers", {})
    pairs = [socket.socketpair() for _ in range(5)]
    try:
        peers = [Peer.of(a) for a, _ in pairs]
        assert len(listeners._unix_peers) <= 2
        assert all(p == Peer(socket.AF_UNIX, os.geteuid(), os.getegid(), os.getpid()) for p in peers)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
