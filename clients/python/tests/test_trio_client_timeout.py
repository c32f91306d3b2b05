"""The trio client's per-call timeout covers the wait behind other calls on the client."""

import pytest
import trio
import trio.testing

from softlb import NEED_DATA, ServerConnection
from softlb_client import Timeout
from softlb_client.trio_client import AsyncClient


async def slow_agent(stream):
    """Answers each request after 0.8 s (virtual time). The agent's side is the core's own
    sans-I/O protocol object, so the fake speaks exactly what the agent speaks."""
    conn = ServerConnection(1 << 20)
    async with stream:
        while data := await stream.receive_some(65536):
            conn.receive_data(data)
            while (req := conn.next_event()) is not NEED_DATA:
                await trio.sleep(0.8)
                await stream.send_all(conn.send_result(req.id, {"ok": type(req).__name__.lower()}))


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
