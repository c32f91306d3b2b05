"""STATUS= lines (the grammar in docs/OPERATIONS.md) and journald-aware logging."""

from __future__ import annotations

import logging
import os
import random
import socket

import pytest

from softlb import AgentConfig, ConfigError
from softlb._engine import Engine
from softlb._types import Endpoint, RegistryHealth

from softlb_agent.service_manager import JournalFormatter, ServiceManager, status_line, stderr_is_journal


def engine_with(**services: list[Endpoint]) -> Engine:
    e = Engine(AgentConfig(), random.Random(1))
    e.replace_all(services, now=100.0)
    return e


def eps(n: int, down: int = 0) -> list[Endpoint]:
    return [Endpoint(id=f"e{i}", address="127.0.0.1", port=9000 + i,
                     registry=RegistryHealth.CRITICAL if i < down else RegistryHealth.PASSING) for i in range(n)]


def test_healthy_file_catalog():
    e = engine_with(web=eps(3), api=eps(2))
    assert status_line(e.services, "file", 100.0) == "serving 2 services, 5 endpoints; catalog: file (fresh)"


def test_ejected_and_panic_are_named():
    e = engine_with(web=eps(4, down=1), api=eps(4, down=3))
    assert status_line(e.services, "file", 100.0) == (
        "serving 2 services, 8 endpoints, 4 ejected; panic: api; catalog: file (fresh)")


def test_stale_consul_data_shows_the_oldest_age():
    e = Engine(AgentConfig(), random.Random(1))
    e.set_service("web", eps(2), now=10.0, stale=True, fetched_at=10.0)
    e.set_service("api", eps(1), now=70.0, stale=True, fetched_at=70.0)
    assert status_line(e.services, "consul", 100.0) == "serving 2 services, 3 endpoints; catalog: consul (stale 90s)"


def test_failed_catalog_reload_and_refused_config_reload():
    e = engine_with(web=eps(1))
    line = status_line(e.services, "file", 100.0, catalog_error="catalog.toml: line 3: bad\nthing",
                       reload_error="agent.toml: agent.listen: expected HOST:PORT")
    assert line == ("serving 1 service, 1 endpoint; catalog: file (last reload failed: catalog.toml: line 3: bad thing); "
                    "reload refused: agent.toml: agent.listen: expected HOST:PORT")


def test_long_reasons_are_cut_to_one_terminal_line():
    sm = ServiceManager({})
    sm.reloaded("x" * 1000, lambda err: err)
    assert len(sm.reload_error) == 160 and sm.reload_error.endswith("…")
    sm.reloaded(None, lambda err: err)
    assert sm.reload_error == ""


def test_status_is_sent_only_when_it_changes(tmp_path):
    path = str(tmp_path / "n.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.setblocking(False)
    try:
        sm = ServiceManager({"NOTIFY_SOCKET": path})
        for text in ("a", "a", "b", "b", "a"):
            sm.status(text)
        got = []
        while True:
            try:
                got.append(rx.recv(100))
            except BlockingIOError:
                break
        assert got == [b"STATUS=a", b"STATUS=b", b"STATUS=a"]
    finally:
        rx.close()


def test_manager_removes_the_variables_meant_for_this_process_only():
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "LISTEN_PID": "1",
           "LISTEN_FDS": "1", "PATH": "/bin"}
    sm = ServiceManager(env)
    assert sm.watchdog_interval == 15.0 and sm.notifier.enabled
    assert env == {"PATH": "/bin"}


def test_journal_formatter_carries_the_syslog_priority():
    f = JournalFormatter()
    rec = logging.LogRecord("softlb.agent", logging.WARNING, __file__, 1, "two\nlines", None, None)
    assert f.format(rec) == "<4>softlb.agent: two\n<4>lines"
    rec = logging.LogRecord("softlb.ipc", logging.DEBUG, __file__, 1, "x", None, None)
    assert f.format(rec) == "<7>softlb.ipc: x"


def test_stderr_is_journal_compares_device_and_inode(tmp_path):
    p = tmp_path / "log"
    with open(p, "w") as fh:
        st = os.fstat(fh.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd=fh.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fd=fh.fileno())
        assert not stderr_is_journal({}, fd=fh.fileno())


def test_a_malformed_socket_handover_is_a_config_error():
    with pytest.raises(ConfigError, match="sockets passed by the service manager: LISTEN_FDS='x'"):
        ServiceManager({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"})
