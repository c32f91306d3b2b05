"""Streaming and framing edge cases the review found: unwatch during a large frame, a
removed-then-added service, bad unwatch targets, duplicate watch ids, a peer that stops
reading."""

import socket

import msgpack
import pytest
import trio
import trio.testing
from agentproc import endpoint_toml
from helpers.frames import frame

from softlb_agent.ipc_server import WRITE_STALL_TIMEOUT, Connection


class FrameReader:
    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def next(self):
        while True:
            if len(self.buf) >= 4:
                n = int.from_bytes(self.buf[:4], "big")
                assert n < 64 << 20, "framing lost: a length prefix read from inside a frame"
                if len(self.buf) >= 4 + n:
                    msg = msgpack.unpackb(self.buf[4:4 + n])
                    self.buf = self.buf[4 + n:]
                    return msg
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            self.buf += data


def connect(agent):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(agent.socket)
    return s, FrameReader(s)


BIG = "".join(endpoint_toml("web", "127.0.0.1", 10000 + i, id=f"w{i}-" + "x" * 200) for i in range(3000))


def test_unwatch_while_a_large_watch_frame_is_half_sent_keeps_framing(make_agent):
    agent = make_agent(catalog=BIG).start()
    s, r = connect(agent)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(frame({"id": 1, "op": "watch", "service": "web"}))
    while len(r.buf) < 4:  # the watch answer (~1 MB) has started: the agent is mid-frame
        r.buf += s.recv(4)
    s.sendall(frame({"id": 2, "op": "unwatch", "watch": 1}) + frame({"id": 3, "op": "services"}))
    first = r.next()
    assert first["id"] == 1 and len(first["result"]["endpoints"]) == 3000
    rest = {m["id"]: m for m in (r.next(), r.next())}
    assert rest[2] == {"id": 2, "result": {}} and rest[3]["result"][0]["name"] == "web"
    s.close()


def test_watch_sees_a_service_removed_and_added_again(agent):
    s, r = connect(agent)
    s.sendall(frame({"id": 1, "op": "watch", "service": "web"}))
    assert len(r.next()["result"]["endpoints"]) == 3
    agent.write_catalog(endpoint_toml("db", "127.0.0.1", 5432))
    assert r.next()["result"]["removed"] is True
    agent.write_catalog(endpoint_toml("web", "127.0.0.1", 18099, id="back"))
    back = r.next()["result"]
    assert [e["id"] for e in back["endpoints"]] == ["back"]
    s.close()


@pytest.mark.parametrize("target", [[1], {"a": 1}, 1.5, None, True])
def test_unwatch_with_a_bad_target_is_answered_and_the_connection_lives(agent, target):
    s, r = connect(agent)
    s.sendall(frame({"id": 7, "op": "unwatch", "watch": target}) + frame({"id": 8, "op": "services"}))
    got = {m["id"]: m for m in (r.next(), r.next())}
    assert got[7]["error"]["code"] == "BAD_ARGUMENT"
    assert got[8]["result"][0]["name"] == "web"
    s.close()
    assert "INTERNAL" not in agent.log()


def test_duplicate_watch_id_is_refused(agent):
    s, r = connect(agent)
    s.sendall(frame({"id": 1, "op": "watch", "service": "web"}) + frame({"id": 1, "op": "watch", "service": "web"}))
    answers = [r.next(), r.next()]
    assert sum("error" in a for a in answers) == 1
    assert [a["error"]["code"] for a in answers if "error" in a] == ["BAD_ARGUMENT"]
    s.sendall(frame({"id": 2, "op": "unwatch", "watch": 1}))
    assert r.next() == {"id": 2, "result": {}}
    s.close()


def test_a_peer_that_stops_reading_is_hung_up_on():
    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        conn = Connection(a, "test")
        t0 = trio.current_time()
        with pytest.raises(ConnectionAbortedError):
            await conn.send(b"x" * (8 << 20))  # far more than the socket buffers hold
        assert trio.current_time() - t0 >= WRITE_STALL_TIMEOUT
        assert b.recv(1 << 20)  # what fit was delivered; then the agent hung up
        a.close()
        b.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
