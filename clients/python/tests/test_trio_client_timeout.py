"""The trio client's per-call timeout covers the wait behind other calls on the client."""

import msgpack
import pytest
import trio
import trio.testing

from softlb_client import Timeout
from softlb_client.trio_client import AsyncClient


async def slow_agent(stream):
    """Answers each request after 0.8 s (virtual time)."""
    buf = b""
    async with stream:
        while data := await stream.receive_some(65536):
            buf += data
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                n = int.from_bytes(buf[:4], "big")
                msg = msgpack.unpackb(buf[4:4 + n])
                buf = buf[4 + n:]
                await trio.sleep(0.8)
                body = msgpack.packb({"id": msg["id"], "result": {"ok": msg["op"]}})
                await stream.send_all(len(body).to_bytes(4, "big") + body)


def test_a_queued_call_times_out_on_time_and_the_first_call_still_succeeds(tmp_path):
    path = str(tmp_path / "agent.sock")

    async def main():
        sock = trio.socket.socket(trio.socket.AF_UNIX)
        await sock.bind(path)
        sock.listen()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, slow_agent, [trio.SocketListener(sock)])
            c = AsyncClient(socket_path=path, timeout=5.0)
            first: list = []

            async def slow_call():
                first.append(await c.call("services"))

            nursery.start_soon(slow_call)
            await trio.sleep(0.05)  # the slow call holds the connection now
            t0 = trio.current_time()
            with pytest.raises(Timeout):
                await c.call("resolve", timeout=0.1, service="web")
            assert trio.current_time() - t0 == pytest.approx(0.1)  # virtual clock: exact
            await trio.sleep(1.0)
            assert first == [{"ok": "services"}]
            await c.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
