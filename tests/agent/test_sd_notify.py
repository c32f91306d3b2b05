"""The notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from pathlib import Path

import pytest
import trio

from softlb_agent import sd_notify
from softlb_agent.sd_notify import Notifier, run_watchdog, watchdog_interval


@pytest.fixture
def manager(tmp_path: Path):
    """A bound datagram socket playing the service manager; yields (NOTIFY_SOCKET, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5.0)
    try:
        yield path, sock
    finally:
        sock.close()


def lines(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_without_notify_socket_every_call_is_a_quiet_noop():
    n = Notifier.from_environ({})
    assert not n.enabled
    assert n.ready("x") is False
    assert n.watchdog() is False
    assert n.stopping() is False


def test_ready_with_status_is_one_datagram(manager):
    path, sock = manager
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert n.ready("serving 3 services, 7 endpoints; catalog: file (fresh)") is True
    assert lines(sock) == ["READY=1", "STATUS=serving 3 services, 7 endpoints; catalog: file (fresh)"]
    n.close()


def test_abstract_socket_address():
    name = f"softlb-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5.0)
    try:
        n = Notifier(f"@{name}")
        assert n.watchdog() is True
        assert lines(sock) == ["WATCHDOG=1"]
        n.close()
    finally:
        sock.close()


def test_reloading_carries_monotonic_usec_from_the_same_clock(manager):
    path, sock = manager
    n = Notifier(path)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading("reloading /etc/softlb/agent.toml")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    got = lines(sock)
    assert got[0] == "RELOADING=1"
    assert got[1].startswith("MONOTONIC_USEC=")
    assert before <= int(got[1].split("=")[1]) <= after
    assert got[2] == "STATUS=reloading /etc/softlb/agent.toml"
    n.ready()
    assert lines(sock) == ["READY=1"]
    n.close()


def test_stopping_and_multiline_status_is_folded(manager):
    path, sock = manager
    n = Notifier(path)
    n.stopping("draining:\n 3 connections")
    assert lines(sock) == ["STOPPING=1", "STATUS=draining: 3 connections"]
    n.status("plain")
    assert lines(sock) == ["STATUS=plain"]
    n.close()


def test_malformed_lines_are_a_programming_error(manager):
    n = Notifier(manager[0])
    with pytest.raises(ValueError):
        n.send("READY=1\nSTATUS=x")
    with pytest.raises(ValueError):
        n.send("READY")


def test_relative_notify_socket_is_refused_clearly(caplog):
    with caplog.at_level(logging.WARNING, logger="softlb.systemd"):
        n = Notifier("notify.sock")
    assert not n.enabled
    assert "NOTIFY_SOCKET='notify.sock': expected an absolute path or @abstract name" in caplog.text


def test_unreachable_manager_returns_false_and_warns_once(tmp_path, caplog):
    n = Notifier(str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.WARNING, logger="softlb.systemd"):
        assert n.watchdog() is False
        assert n.watchdog() is False
        assert n.ready() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one for WATCHDOG, one for READY
    n.close()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # a parent's watchdog
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_defaults_to_this_process():
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0


def test_unset_environment_removes_only_the_managers_variables():
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "PATH": "/bin"}
    sd_notify.unset_environment(env)
    assert env == {"PATH": "/bin"}


def with_watchdog(path: str, interval: float, body) -> None:
    """Run `body()` inside trio while run_watchdog pings `path` every `interval` seconds."""
    n = Notifier(path)

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(run_watchdog, n, interval)
                await body()
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        n.close()


def test_run_watchdog_pings_from_the_trio_loop(manager):
    path, sock = manager

    async def body():
        # started() comes after the first ping, so one is already queued.
        assert lines(sock) == ["WATCHDOG=1"]
        await trio.to_thread.run_sync(lines, sock)  # a second one arrives by itself

    with_watchdog(path, 0.01, body)


def test_a_wedged_trio_loop_sends_no_pings(manager):
    """The point of pinging from the loop: blocking it must starve the watchdog."""
    path, sock = manager

    async def body():
        await trio.sleep(0.02)
        drain(sock)
        time.sleep(0.1)  # wedge the loop: 20 intervals pass without a chance to ping
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
        sock.settimeout(5.0)
        await trio.to_thread.run_sync(lines, sock)  # unwedged: pings resume

    with_watchdog(path, 0.005, body)


def drain(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.recv(4096)
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5.0)


def test_run_watchdog_rejects_nonsense_interval(manager):
    async def main():
        with pytest.raises(ValueError):
            await run_watchdog(Notifier(manager[0]), 0)

    trio.run(main)


def test_a_manager_that_never_reads_costs_dropped_messages_not_a_blocked_agent(tmp_path):
    import threading

    path = str(tmp_path / "notify.sock")
    never_read = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    never_read.bind(path)
    n = Notifier(path)
    results: list[bool] = []
    t = threading.Thread(target=lambda: results.extend(n.send(f"STATUS=message {i}") for i in range(500)), daemon=True)
    t.start()
    t.join(timeout=10)
    never_read.close()
    assert not t.is_alive(), "send blocked on a full notify queue"
    assert results[0] is True and results[-1] is False  # the queue filled, later ones were dropped


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/path"])
def test_an_unusable_notify_socket_turns_notifications_off(value):
    n = Notifier(value)
    assert not n.enabled and n.send("READY=1") is False
