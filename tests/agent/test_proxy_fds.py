"""Proxy connections in the agent's fd budget (issue 10's fd reserve; agent/proxy/fds.py)."""

from __future__ import annotations

import os
import socket
import struct
import time

from agent.proxy.fds import PER_CONNECTION, RECOUNT_EVERY, FdRoom, open_fds

from agentproc import free_port, wait_until
from test_isolation import PROBED, Backends, metric
from test_proxy_tcp import proxy_config


class Fds:
    """A process's open fds as a test sets them, counting how often they are listed."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.listings = 0

    def __call__(self) -> int:
        self.listings += 1
        return self.n


def test_room_until_within_the_reserve_of_the_limit() -> None:
    fds = Fds(100)
    reserve = [128]
    room = FdRoom(lambda: reserve[0], count=fds, limit=lambda: 256)
    assert room.has_room()  # 100 + 6 <= 128
    fds.n = 128 - PER_CONNECTION
    room.recount()
    assert room.has_room()
    fds.n += 1
    room.recount()
    assert not room.has_room()
    reserve[0] = 64  # a reload lowered the reserve: read at the next count
    assert room.has_room()


def test_room_lists_fds_rarely_far_from_the_ceiling_and_always_near_it() -> None:
    fds = Fds(10)
    room = FdRoom(lambda: 128, count=fds, limit=lambda: 100_000)
    for _ in range(RECOUNT_EVERY):
        assert room.has_room()
        room.took()
    assert fds.listings == 1
    assert room.has_room() and fds.listings == 2  # RECOUNT_EVERY accepts: listed again
    # Near the ceiling: once the estimate (PER_CONNECTION per accept) says it is, the
    # real count decides, each time.
    fds = Fds(10)
    near = FdRoom(lambda: 128, count=fds, limit=lambda: 128 + 10 + 3 * PER_CONNECTION)
    for _ in range(3):
        assert near.has_room() and near.near
        near.took()
    assert fds.listings == 1
    assert near.has_room() and fds.listings == 2  # the real count: still 10
    far = FdRoom(lambda: 128, count=Fds(10), limit=lambda: 100_000)
    assert far.has_room() and not far.near


def test_open_fds_counts_the_process() -> None:
    before = open_fds()
    r, w = os.pipe()
    try:
        assert open_fds() == before + 2
    finally:
        os.close(r)
        os.close(w)


def test_proxy_connections_stop_short_of_the_fd_reserve(make_agent) -> None:
    """ulimit -n 256 and 300 clients on a tcp proxy listener (max_connections far above):
    the listener stops accepting with the agent's fds within fd_reserve of the limit,
    leaving the rest queued in the kernel; the prober's probes keep passing (none skipped
    for want of fds), a new IPC connection is answered, and once the clients leave the
    queued connections are taken."""
    backends = Backends()  # listening, never accepting: every proxied connection stays open
    port = free_port()
    held: list[socket.socket] = []
    try:
        agent = make_agent(catalog=backends.catalog(), nofile=256,
                           config="[agent]\nmax_connections = 100000\n" + PROBED
                           + proxy_config("web", port, "tcp", max_connections=100000, idle_timeout="5m")).start()
        with agent.client(timeout=2) as c:
            wait_until(lambda: all(e["health"]["probe"] == "up" for e in c.endpoints("web")["endpoints"]))
            for _ in range(300):
                try:
                    held.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
                except OSError:
                    break  # the listening socket's queue is full: enough
            wait_until(lambda: metric(agent, "softlb_proxy_fd_reserve_waits_total") >= 1)
            time.sleep(1.5)  # 15 probe rounds
            agent_fds = len(os.listdir(f"/proc/{agent.proc.pid}/fd"))
            assert agent_fds <= 256 - 128 + PER_CONNECTION, agent_fds
            accepted = metric(agent, 'softlb_proxy_listener_connections_total{service="web"}')
            assert 10 < accepted < len(held), (accepted, len(held))
            rows = c.endpoints("web")["endpoints"]
            assert all(e["eligible"] and e["health"]["probe"] == "up" for e in rows), rows
            assert metric(agent, "softlb_probe_local_failures_total") == 0
        with agent.client(timeout=2) as c2:  # a new IPC connection, accepted and answered
            assert c2.resolve("web", lease=False).port in [s.getsockname()[1] for s in backends.socks]
        for s in held:  # a reset, so the tunnels end (a FIN would half-close them)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        held.clear()
        wait_until(lambda: metric(agent, 'softlb_proxy_listener_connections_total{service="web"}') > accepted)
    finally:
        for s in held:
            s.close()
        backends.close()
