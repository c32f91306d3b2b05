"""Inherited sockets: the environment protocol, classification, matching.

The fd-passing paths run for real in child processes: under `systemd-socket-activate`, and
under tests/helpers/socket_holder.py; the in-process tests cover parsing and matching.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentproc import free_port
from helpers.socket_holder import SocketHolder

from softlb_agent.app import bind_tcp, bind_unix
from softlb_agent.listen_fds import (
    InheritedListeners,
    InheritedSocket,
    ListenFdsError,
    format_address,
    listen_fds,
)

PID_SERVER = Path(__file__).resolve().parents[1] / "helpers" / "pid_server.py"


# --------------------------------------------------------------------------- environment


def test_no_variables_means_no_sockets():
    assert listen_fds({}, pid=10) == []


def test_variables_for_another_process_are_ignored_and_removed():
    env = {"LISTEN_PID": "11", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "HOME": "/root"}
    assert listen_fds(env, pid=10) == []
    assert env == {"HOME": "/root"}


def test_variables_can_be_kept_for_inspection():
    env = {"LISTEN_PID": "11", "LISTEN_FDS": "1"}
    listen_fds(env, pid=10, unset=False)
    assert env == {"LISTEN_PID": "11", "LISTEN_FDS": "1"}


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LISTEN_PID": "10", "LISTEN_FDS": "two"}, "LISTEN_FDS='two'"),
        ({"LISTEN_PID": "10"}, "LISTEN_FDS=''"),
        ({"LISTEN_PID": "10", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}, "1 names for LISTEN_FDS=2"),
    ],
)
def test_malformed_variables_are_a_clear_error_and_still_removed(env, message):
    with pytest.raises(ListenFdsError, match=message):
        listen_fds(env, pid=10)
    assert not any(k.startswith("LISTEN_") for k in env)


# --------------------------------------------------------------------------- matching


def inherited(sock: socket.socket, name: str = "unknown") -> InheritedSocket:
    return InheritedSocket(sock=sock, name=name, family=sock.family,
                           address=format_address(sock.family, sock.getsockname()))


@pytest.fixture
def live_sockets(request):
    def make(kind: str, where: str) -> socket.socket:
        s = bind_unix(where) if kind == "unix" else bind_tcp(where)
        request.addfinalizer(s.close)
        return s

    return make


def test_claim_prefers_the_fd_name_then_the_address(live_sockets, tmp_path):
    a = inherited(live_sockets("tcp", "127.0.0.1:0"), "admin")
    b = inherited(live_sockets("tcp", "127.0.0.1:0"))
    pool = InheritedListeners([b, a])
    # `b` is bound where "listen" should be, but nothing is named "listen": matched by address.
    assert pool.claim("admin", b.address) is a
    assert pool.claim("listen", b.address) is b
    assert len(pool) == 0


def test_unix_and_tcp_in_one_unit_are_told_apart_by_family_and_address(live_sockets, tmp_path):
    path = str(tmp_path / "softlb.sock")
    unix = inherited(live_sockets("unix", path), "softlb")
    tcp = inherited(live_sockets("tcp", "127.0.0.1:0"), "softlb")
    pool = InheritedListeners([tcp, unix])
    assert pool.claim("socket", str(tmp_path / "." / "softlb.sock")) is unix
    assert pool.claim("listen", f"localhost:{tcp.sock.getsockname()[1]}") is tcp


def test_sole_unix_socket_is_taken_whatever_its_path(live_sockets, tmp_path):
    unix = inherited(live_sockets("unix", str(tmp_path / "elsewhere.sock")))
    pool = InheritedListeners([unix])
    assert pool.claim("socket", str(tmp_path / "configured.sock")) is None
    assert pool.claim("socket", str(tmp_path / "configured.sock"), sole_unix=True) is unix


def test_wrong_port_or_host_does_not_match(live_sockets):
    tcp = inherited(live_sockets("tcp", "127.0.0.1:0"))
    port = tcp.sock.getsockname()[1]
    pool = InheritedListeners([tcp])
    assert pool.claim("listen", f"127.0.0.1:{port + 1 if port < 65535 else 1}") is None
    assert pool.claim("listen", f"127.0.0.2:{port}") is None
    assert pool.claim("listen", f"[::1]:{port}") is None
    assert pool.claim("listen", "") is None
    assert pool.claim("socket", f"/run/x:{port}", sole_unix=True) is None


def test_ipv6_address_format_and_match(live_sockets):
    try:
        tcp = inherited(live_sockets("tcp", "[::1]:0"))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback on this host: {e}")
    assert tcp.address.startswith("[::1]:")
    assert InheritedListeners([tcp]).claim("listen", tcp.address) is tcp


def test_unclaimed_sockets_are_closed_and_reported(live_sockets):
    tcp = inherited(live_sockets("tcp", "127.0.0.1:0"))
    pool = InheritedListeners([tcp])
    assert pool.close_unclaimed() == [tcp]
    assert tcp.sock.fileno() == -1


# --------------------------------------------------------------------------- real fd passing


def ask(address, line: str = "hi") -> dict:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(10.0)
        c.connect(address)
        c.sendall(line.encode() + b"\n")
        return json.loads(c.makefile("rb").readline())


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def wait_listening(proc: subprocess.Popen, sockets: int, timeout: float = 10.0) -> None:
    """Until the activator has said "Listening on ..." for every socket: the path of a Unix
    socket appears at bind(), before listen(), so its existence proves nothing."""
    deadline, seen, buf = time.monotonic() + timeout, 0, b""
    while seen < sockets:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"activator not listening after {timeout}s: {buf!r}")
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"systemd-socket-activate exited: {buf!r}")
        buf += chunk
        seen = buf.count(b"Listening on ")


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_sockets_from_systemd_socket_activate(tmp_path):
    path = str(tmp_path / "softlb.sock")
    port = free_port()
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", path, "-l", f"127.0.0.1:{port}", "--fdname=ipc:listen",
         sys.executable, str(PID_SERVER)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_listening(proc, 2)
        # The activator execs the server (same pid) on the first connection.
        first = ask(("127.0.0.1", port), "over tcp")
        info = json.loads(proc.stdout.readline())
        assert info["pid"] == proc.pid == first["pid"]
        assert info["env_left"] == []
        assert [(s["fd"], s["name"], s["unix"]) for s in info["sockets"]] == [
            (3, "ipc", True), (4, "listen", False)]
        assert info["sockets"][0]["address"] == path
        assert info["sockets"][1]["address"] == f"127.0.0.1:{port}"
        assert first == {"pid": proc.pid, "name": "listen", "address": f"127.0.0.1:{port}", "echo": "over tcp"}
        assert ask(path, "over unix")["name"] == "ipc"
    finally:
        stop(proc)


def test_a_datagram_socket_is_refused_with_its_fd_and_name():
    dgram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dgram.bind(("127.0.0.1", 0))
    with SocketHolder([("metrics", dgram)]) as holder:
        child = holder.start([sys.executable, str(PID_SERVER)], stdout=subprocess.PIPE)
        out = json.loads(child.stdout.readline())
        assert child.wait(10) == 2
        assert "fd 3 (metrics)" in out["error"] and "stream" in out["error"]


def test_a_socket_that_is_not_listening_is_refused():
    unbound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with SocketHolder([("listen", unbound)]) as holder:
        child = holder.start([sys.executable, str(PID_SERVER)], stdout=subprocess.PIPE)
        out = json.loads(child.stdout.readline())
        assert child.wait(10) == 2
        assert "not listening" in out["error"]


# --------------------------------------------------------------------------- loopback rule


@pytest.mark.parametrize("role", ["listen", "admin", "proxy-web"])
def test_an_inherited_socket_on_a_non_loopback_address_is_refused(role):
    """Issue 10, item 8: sockets passed by systemd skipped the loopback rule that
    agent.listen and agent.admin obey when the agent binds them itself."""
    from softlb import ConfigError
    from softlb_agent.service_manager import ServiceManager

    wide = bind_tcp("0.0.0.0:0")
    sm = ServiceManager({})
    sm.inherited = InheritedListeners([InheritedSocket(wide, role, socket.AF_INET, format_address(socket.AF_INET, wide.getsockname()))])
    with pytest.raises(ConfigError, match="0.0.0.0 is not a loopback address"):
        sm.listener(role, "127.0.0.1:7070", bind_tcp)
    assert wide.fileno() == -1  # closed: systemd keeps its own copy
    # ...unless the operator allowed it, as for a bound socket.
    wide2 = bind_tcp("0.0.0.0:0")
    sm.inherited = InheritedListeners([InheritedSocket(wide2, role, socket.AF_INET, format_address(socket.AF_INET, wide2.getsockname()))])
    sock, _, inherited = sm.listener(role, "127.0.0.1:7070", bind_tcp, allow_non_loopback=True)
    assert inherited and sock is wide2
    sock.close()


def test_an_inherited_loopback_socket_is_used():
    from softlb_agent.service_manager import ServiceManager

    lo = bind_tcp("127.0.0.1:0")
    sm = ServiceManager({})
    sm.inherited = InheritedListeners([InheritedSocket(lo, "listen", socket.AF_INET, format_address(socket.AF_INET, lo.getsockname()))])
    sock, _, inherited = sm.listener("listen", "127.0.0.1:7070", bind_tcp)
    assert inherited and sock is lo
    sock.close()
