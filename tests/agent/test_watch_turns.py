"""A connection's watches start and end a bounded number per scheduler pass (issue 10): 250
watches in one write used to start 64 watch tasks in the next pass, and closing the
connection ended all 250 in one (in-process serve_listener with turns and the lot, real
sockets)."""

from __future__ import annotations

import random
import socket

import trio
import trio.testing
from agentproc import endpoint_toml
from helpers.frames import frame
from helpers.passes import PassSteps
from test_drain_edges import frames, listener

from softlb import AgentConfig
from softlb._filecatalog import parse_catalog_text
from softlb_agent import ipc_server
from softlb_agent.lot import Lot
from softlb_agent.runtime import Runtime
from softlb_agent.turns import Turns

WATCHES = 250


def test_watches_start_and_end_a_slice_per_pass(tmp_path) -> None:
    async def main() -> None:
        config = AgentConfig()
        rt = Runtime(config, None, random.Random(1))
        text = "".join(endpoint_toml(f"s{i}", "127.0.0.1", 10000 + i) for i in range(WATCHES))
        rt.dispatch(rt.engine.replace_all(parse_catalog_text(text), trio.current_time()))
        path = str(tmp_path / "s.sock")
        lsock = listener(path)
        c = socket.socket(socket.AF_UNIX)
        steps = PassSteps("_handle_deferred")
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                rt.turns = Turns()
                await n.start(rt.turns.run)
                rt.lot = Lot(rt.turns)
                await n.start(rt.lot.run)
                await n.start(lambda task_status: ipc_server.serve_listener(rt, lsock, task_status=task_status))
                trio.lowlevel.add_instrument(steps)
                c.connect(path)
                c.setblocking(False)
                c.send(b"".join(frame({"id": i, "op": "watch", "service": f"s{i}"}) for i in range(WATCHES)))
                buf = b""
                while len(frames(buf)) < WATCHES:
                    await trio.lowlevel.wait_readable(c)
                    buf += c.recv(1 << 20)
                assert sorted(f["id"] for f in frames(buf)) == list(range(WATCHES))
                started = dict(steps.steps)
                steps.steps.clear()
                c.close()
                while rt.watchers:
                    await trio.sleep(0.01)
                ended = dict(steps.steps)
                trio.lowlevel.remove_instrument(steps)
                n.cancel_scope.cancel()
        lsock.close()
        # Old code: 64 starts in a pass, then all 250 ends in one.
        assert max(started.values()) <= 16, started
        assert max(ended.values()) <= 2 * ipc_server.WATCH_END_SLICE, ended
        assert sum(ended.values()) >= WATCHES

    trio.run(main)
