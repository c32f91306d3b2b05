"""The relay under tcp mode (agent/proxy/relay.py), on real loopback TCP sockets: bytes
both ways unchanged through the copy and the splice path, backpressure, half-close, reset,
abort. (The agent-level tests in test_proxy_tcp.py run it behind a listener.)"""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
import trio

from agent.proxy.relay import SMALL, Idle, Relay, Tunnel, splice_available


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    for s in (a, b):
        s.setblocking(False)
    return a, b


async def _send_all(s: socket.socket, data: bytes, shut: bool = True) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[s.send(view[: 1 << 16]):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(s)
    if shut:
        s.shutdown(socket.SHUT_WR)


async def _read_all(s: socket.socket, into: list[bytes], slow: bool = False) -> None:
    while True:
        try:
            chunk = s.recv(1 << 16)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(s)
            continue
        if not chunk:
            return
        into.append(chunk)
        if slow:
            await trio.sleep(0.001)  # a slow reader: the relay must hold back, not drop


def _setup(use_splice: bool):
    # client <-> (ca | relay | ub) <-> upstream
    client, ca = _tcp_pair()
    ub, upstream = _tcp_pair()
    counts = {"ab": 0, "ba": 0}

    def ab(n: int) -> None:
        counts["ab"] += n

    def ba(n: int) -> None:
        counts["ba"] += n

    scope = trio.CancelScope()
    tunnel = Tunnel(ca, ub, Idle(scope, 60), ab, ba, use_splice=use_splice)
    return client, upstream, tunnel, counts, (ca, ub)


def _run(body, use_splice: bool = True) -> Tunnel:
    """Relay a client <-> upstream pair; run `body(client, upstream, tunnel, inner)` beside
    the relay task; close every socket after."""
    client, upstream, tunnel, _, inner = _setup(use_splice)

    async def main() -> None:
        relay = Relay()
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(relay.run)
                relay.add(tunnel)
                await body(client, upstream, tunnel, inner, relay)
                n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        for s in (client, upstream, *inner):
            s.close()
    return tunnel


@pytest.mark.parametrize("use_splice", [False, pytest.param(True, marks=pytest.mark.skipif(
    not splice_available(), reason="os.splice needs Linux and Python 3.10+"))])
def test_relay_moves_both_ways_with_half_close_and_backpressure(use_splice: bool) -> None:
    up_blob = os.urandom(SMALL // 3) + os.urandom(6 << 20)  # a small read first, then bulk
    down_blob = os.urandom(3 << 20)

    async def main() -> None:
        client, upstream, tunnel, counts, inner = _setup(use_splice)
        relay = Relay()
        got_up: list[bytes] = []
        got_down: list[bytes] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(relay.run)
                relay.add(tunnel)
                async with trio.open_nursery() as io:
                    io.start_soon(_send_all, client, up_blob)
                    io.start_soon(_read_all, upstream, got_up, True)
                    io.start_soon(_send_all, upstream, down_blob)
                    io.start_soon(_read_all, client, got_down)
                await tunnel.done.wait()
                n.cancel_scope.cancel()
        assert not tunnel.broken
        assert hashlib.sha256(b"".join(got_up)).digest() == hashlib.sha256(up_blob).digest()
        assert b"".join(got_down) == down_blob
        assert counts == {"ab": len(up_blob), "ba": len(down_blob)}
        for s in (client, upstream, *inner):
            s.close()

    trio.run(main)


def test_relay_one_side_ends_the_other_keeps_flowing() -> None:
    async def body(client, upstream, tunnel, inner, relay) -> None:
        await _send_all(upstream, b"bye\n")  # the upstream is done talking
        got: list[bytes] = []
        await _read_all(client, got)  # EOF reaches the client
        assert b"".join(got) == b"bye\n"
        await _send_all(client, b"still talking")  # the client side still flows
        got = []
        await _read_all(upstream, got)
        assert b"".join(got) == b"still talking"
        await tunnel.done.wait()

    assert not _run(body).broken


def test_relay_reset_on_one_side_resets_the_other() -> None:
    async def body(client, upstream, tunnel, inner, relay) -> None:
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        upstream.close()  # RST
        await tunnel.done.wait()
        for s in inner:
            s.close()  # what the owner does next; the resets go out now
        with pytest.raises(ConnectionResetError):
            await _read_all(client, [])

    assert _run(body).broken


def test_relay_abort_resets_both_and_stops_watching() -> None:
    async def body(client, upstream, tunnel, inner, relay) -> None:
        tunnel.abort()  # the owner's scope was cancelled (drain, idle)
        assert tunnel.done.is_set() and tunnel.broken
        assert not relay._tunnels  # nothing left that names those fds
        for s in inner:
            s.close()
        for s in (client, upstream):
            with pytest.raises(ConnectionResetError):
                await _read_all(s, [])

    _run(body)
