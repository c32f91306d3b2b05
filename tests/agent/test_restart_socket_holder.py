"""The socket-holder harness: sockets outlive the server process, so a restart refuses nobody."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from helpers.socket_holder import SocketHolder

PID_SERVER = Path(__file__).resolve().parents[1] / "helpers" / "pid_server.py"


def connect(address) -> socket.socket:
    c = socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET)
    c.settimeout(10.0)
    c.connect(address)
    return c


def exchange(c: socket.socket, line: str) -> dict:
    c.sendall(line.encode() + b"\n")
    return json.loads(c.makefile("rb").readline())


def start(holder: SocketHolder) -> int:
    child = holder.start([sys.executable, str(PID_SERVER)], stdout=subprocess.PIPE)
    info = json.loads(child.stdout.readline())  # printed once it holds the sockets
    assert info["pid"] == child.pid
    return child.pid


def test_child_sees_the_held_sockets_at_fd_3_with_names(tmp_path):
    path = str(tmp_path / "softlb.sock")
    with SocketHolder.bind(unix_path=path, names=["ipc", "listen"]) as holder:
        child = holder.start([sys.executable, str(PID_SERVER)], stdout=subprocess.PIPE)
        info = json.loads(child.stdout.readline())
        assert [(s["fd"], s["name"], s["unix"]) for s in info["sockets"]] == [
            (3, "ipc", True), (4, "listen", False)]
        assert info["env_left"] == []
        with connect(path) as c:
            assert exchange(c, "a")["name"] == "ipc"
        with connect(holder.tcp_address) as c:
            assert exchange(c, "b") == {
                "pid": child.pid, "name": "listen", "echo": "b",
                "address": "%s:%d" % holder.tcp_address}


def test_connections_made_while_the_server_is_dead_are_answered_by_the_next(tmp_path):
    path = str(tmp_path / "softlb.sock")
    with SocketHolder.bind(unix_path=path, names=["ipc", "listen"]) as holder:
        first = start(holder)
        with connect(path) as c:
            assert exchange(c, "before")["pid"] == first
        assert holder.kill() == -9

        # No server process exists now; the kernel still completes these connects because
        # the holder keeps the listening sockets open, and queues them for accept().
        waiting = [connect(path), connect(holder.tcp_address)]
        for i, c in enumerate(waiting):
            c.sendall(f"queued {i}\n".encode())

        second = start(holder)
        assert second != first
        for i, c in enumerate(waiting):
            with c:
                reply = json.loads(c.makefile("rb").readline())
                assert reply["pid"] == second and reply["echo"] == f"queued {i}"
        assert holder.pids == [first, second]


def test_start_refuses_while_a_child_runs(tmp_path):
    with SocketHolder.bind(tcp="127.0.0.1:0") as holder:
        start(holder)
        try:
            holder.start([sys.executable, str(PID_SERVER)])
        except RuntimeError as e:
            assert "still running" in str(e)
        else:
            raise AssertionError("a second child was started on the same sockets")
