"""The drain meeting work in flight: a watch half way through a large frame, and a watch
requested in the very tick the drain starts (in-process serve_listener, real sockets)."""

import random
import socket

import msgpack
import trio
from agentproc import endpoint_toml
from helpers.frames import frame

from softlb import AgentConfig
from softlb._filecatalog import parse_catalog_text
from softlb_agent import ipc_server
from softlb_agent.runtime import Runtime


def runtime(n: int, id_len: int) -> Runtime:
    rt = Runtime(AgentConfig(), None, random.Random(1))
    text = "".join(endpoint_toml("web", "127.0.0.1", 10000 + i, id=f"w{i}-" + "x" * id_len) for i in range(n))
    rt.dispatch(rt.engine.replace_all(parse_catalog_text(text), trio.current_time()))
    return rt


def listener(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(16)
    return s


def frames(buf: bytes) -> list:
    out = []
    while len(buf) >= 4:
        n = int.from_bytes(buf[:4], "big")
        assert n < 64 << 20, "framing lost"
        if len(buf) < 4 + n:
            break
        out.append(msgpack.unpackb(buf[4:4 + n]))
        buf = buf[4 + n:]
    return out


def test_drain_lets_a_half_sent_watch_frame_finish(tmp_path):
    async def main():
        rt = runtime(3000, 200)  # the watch answer is ~1.5 MB
        lsock = listener(str(tmp_path / "s.sock"))
        draining = trio.Event()
        c = socket.socket(socket.AF_UNIX)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.setblocking(False)
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                await n.start(lambda task_status: ipc_server.serve_listener(
                    rt, lsock, draining=draining, task_status=task_status))
                c.connect(str(tmp_path / "s.sock"))
                c.send(frame({"id": 1, "op": "watch", "service": "web"}))
                await trio.sleep(0.3)  # the watch is blocked mid-frame on our full buffer
                draining.set()
                buf = b""
                while True:
                    await trio.lowlevel.wait_readable(c)
                    data = c.recv(1 << 20)
                    if not data:
                        break
                    buf += data
        got = frames(buf)
        assert [f["id"] for f in got] == [1] and len(got[0]["result"]["endpoints"]) == 3000
        assert "INTERNAL" not in rt.stats.errors
        c.close()
        lsock.close()

    trio.run(main)


def test_a_watch_arriving_as_the_drain_starts_does_not_hold_the_connection(tmp_path):
    async def main():
        rt = runtime(3, 1)
        lsock = listener(str(tmp_path / "s.sock"))
        draining = trio.Event()
        c = socket.socket(socket.AF_UNIX)
        done = trio.Event()

        async def serve(task_status):
            await ipc_server.serve_listener(rt, lsock, draining=draining, task_status=task_status)
            done.set()

        async with trio.open_nursery() as n:
            await n.start(serve)
            c.connect(str(tmp_path / "s.sock"))
            await trio.sleep(0.2)  # accepted; the reader is parked
            c.send(frame({"id": 1, "op": "watch", "service": "web"}))
            draining.set()  # the same tick
            with trio.move_on_after(5):  # the drain's own bound is 10 s
                await done.wait()
            assert done.is_set(), f"still open: {rt.stats.connections_open}, watchers {dict(rt.watchers)}"
            assert not rt.watchers
            n.cancel_scope.cancel()
        c.close()
        lsock.close()

    trio.run(main)
