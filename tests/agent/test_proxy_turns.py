"""Proxied work takes turns in the agent's pass budget (agent/turns.py): a local user driving
a proxy listener flat out shares the scheduler pass with every other caller on the host
instead of filling it (bench/bystander.py, phases proxy_http and proxy_tcp)."""

from __future__ import annotations

import socket

import pytest
import trio

from agent.proxy.relay import Idle, Relay, Tunnel
from agent.turns import Turns
from agentproc import endpoint_toml, free_port, wait_until
from proxyhelp import DemoBackends, wait_port
from test_isolation import metric
from test_proxy_tcp import proxy_config

QUEUED = "softlb_turns_queued_total"


def test_a_relay_woken_in_a_spent_pass_waits_for_its_turn_then_moves_everything() -> None:
    client, inner_c = socket.socketpair()
    inner_u, upstream = socket.socketpair()
    for s in (inner_c, inner_u):
        s.setblocking(False)
    moved: list[int] = []

    async def main() -> None:
        turns = Turns(4)  # its releaser not started yet: the pass stays spent until it is
        assert all(turns.free("someone") for _ in range(4))
        relay = Relay(turns, "proxy/t")
        tunnel = Tunnel(inner_c, inner_u, Idle(trio.CancelScope(), 60), moved.append, moved.append,
                        use_splice=False)
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(relay.run)
                relay.add(tunnel)
                client.sendall(b"x" * 1000)
                while not turns.queued:  # the relay woke, found the pass spent, and queued
                    await trio.sleep(0.01)
                assert moved == []
                await n.start(turns.run)  # the releaser lets it go
                while sum(moved) < 1000:
                    await trio.sleep(0.01)
                n.cancel_scope.cancel()

    try:
        trio.run(main)
        upstream.settimeout(5)
        got = b""
        while len(got) < 1000:
            got += upstream.recv(4096)
        assert got == b"x" * 1000
    finally:
        for s in (client, inner_c, inner_u, upstream):
            s.close()


def _read_responses(s: socket.socket, n: int) -> list[int]:
    """Statuses of `n` HTTP/1.1 answers read off one connection (content-length bodies)."""
    f = s.makefile("rb")
    codes = []
    for _ in range(n):
        codes.append(int(f.readline().split()[1]))
        length = 0
        while (line := f.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        f.read(length)
    return codes


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_a_flood_through_a_proxy_listener_is_answered_whole_while_a_resolve_caller_is_served(make_agent, mode):
    """48 connections each with 10 pipelined requests, readable together: more than a
    pass's budget. Every request is answered (a relay that polls fewer events than are
    ready loses none), a resolve caller is answered meanwhile, and in http mode the
    requests queued for their turn."""
    b = DemoBackends(2)
    socks: list[socket.socket] = []
    try:
        port = free_port()
        agent = make_agent(b.catalog(), proxy_config("web", port, mode)).start()
        wait_port(port)
        before = metric(agent, QUEUED)
        socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(48)]
        for s in socks:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        with agent.client() as c:
            for _ in range(20):
                assert c.resolve("web").port in b.ports
        for s in socks:
            assert _read_responses(s, 10) == [200] * 10
        if mode == "http":
            assert wait_until(lambda: metric(agent, QUEUED) > before, 10)
    finally:
        for s in socks:
            s.close()
        b.stop()


def test_an_http2_client_opening_hundreds_of_streams_in_one_write_takes_turns_and_gets_every_answer(make_agent):
    """24 connections each write 100 gRPC calls (HEADERS + DATA) at once: one read of the
    proxy holds ~200 events, handled in slices with a turn each. Every call is answered,
    a resolve caller is answered meanwhile, and the slices queued for their turn."""
    from proxyhelp import GrpcBackend
    from softlb import DataReceived, H2Connection, ResponseReceived, StreamReset, TrailersReceived

    backends = [GrpcBackend("g1"), GrpcBackend("g2")]
    socks: list[tuple[socket.socket, H2Connection]] = []
    head = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/demo.Echo/Call"), (b":authority", b"x"),
            (b"content-type", b"application/grpc"), (b"te", b"trailers")]
    try:
        port = free_port()
        catalog = "".join(endpoint_toml("g", "127.0.0.1", b.port, id=b.name) for b in backends)
        agent = make_agent(catalog, proxy_config("g", port, "http2")).start()
        wait_port(port)
        before = metric(agent, QUEUED)
        for _ in range(24):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            c = H2Connection(True)
            c.initiate()
            for _ in range(100):
                sid = c.next_stream_id
                c.send_headers(sid, head)
                c.send_data(sid, b"\0\0\0\0\1x", end_stream=True)
            socks.append((s, c))
        for s, c in socks:
            s.sendall(c.data_to_send())
        with agent.client() as cl:
            for _ in range(20):
                assert cl.resolve("g").port in {b.port for b in backends}
        for s, c in socks:
            answered = 0
            while answered < 100:
                data = s.recv(65536)
                assert data, f"the proxy closed after {answered} answers"
                for ev in c.receive_data(data):
                    t = type(ev)
                    if t is DataReceived:
                        c.ack_data(ev.stream_id, ev.flow_controlled_length)
                    assert t is not StreamReset, ev
                    if t is TrailersReceived or (t is ResponseReceived and ev.end_stream):
                        answered += 1
                s.sendall(c.data_to_send())
        assert sum(b.calls for b in backends) == 2400
        assert wait_until(lambda: metric(agent, QUEUED) > before, 10)
    finally:
        for s, _ in socks:
            s.close()
        for b in backends:
            b.close()


def test_an_http2_client_lost_while_its_read_waits_for_a_turn_opens_nothing() -> None:
    """A client's read waits for its turn; meanwhile its connection is lost (a write to it
    failed, which drops its streams). When the turn comes, nothing is opened for it: a
    stream opened then would hold its lease and its upstream stream forever (no task is
    left to end it)."""
    from agent.proxy.http2 import Side
    from softlb import H2Connection

    peer, mine = socket.socketpair()
    client = H2Connection(True)
    client.initiate()
    client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"x")],
                        end_stream=True)
    handled: list[list[object]] = []

    async def main() -> None:
        turns = Turns(1)  # its releaser not started yet: the pass stays spent until it is
        assert turns.free("someone")
        side = Side(trio.socket.from_stdlib_socket(mine), client_side=False)
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(side.read_loop, lambda s, events: handled.append(events), turns, "proxy/t")
                peer.sendall(client.data_to_send())
                while not turns.queued:
                    await trio.sleep(0.01)
                side.lost()
                await n.start(turns.run)
                while turns.queued:
                    await trio.sleep(0.01)
                await trio.sleep(0.05)
                n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        peer.close()
        mine.close()
    assert handled == []
