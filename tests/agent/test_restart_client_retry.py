"""The thin clients' retry-once, against a scripted server: a stopping agent may close a
connection before answering (even one it has just accepted), and the caller must not see it."""

from __future__ import annotations

import socket
import threading

import pytest
import trio

from softlb._protocol import ok_frame
from softlb._wire import FrameDecoder, NEED_DATA, decode_body
from softlb_client import AgentUnavailable, Client
from softlb_client.trio_client import AsyncClient


class ScriptedAgent:
    """Accepts connections on a Unix socket; for each, reads one request and either answers
    it or closes without a word, following `script` ("close" / "answer"), then "answer"."""

    def __init__(self, path: str, script: list[str]) -> None:
        self.script = list(script)
        self.connections = 0
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(16)
        self.listener.settimeout(10)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            action = self.script.pop(0) if self.script else "answer"
            with conn:
                conn.settimeout(10)
                dec = FrameDecoder(1 << 20)
                while True:
                    body = dec.next_body()
                    if body is not NEED_DATA:
                        break
                    data = conn.recv(65536)
                    if not data:
                        break
                    dec.feed(data)
                if action == "answer" and body is not NEED_DATA:
                    msg = decode_body(body)
                    conn.sendall(ok_frame(msg["id"], {"version": 1, "agent": "scripted"}))
                    # Keep the connection for the client's next call, like a real agent.
                    try:
                        while conn.recv(65536):
                            pass
                    except OSError:
                        pass

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept(); shutdown() does (Linux).
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(10)


@pytest.fixture
def scripted(tmp_path, request):
    def make(script):
        a = ScriptedAgent(str(tmp_path / "agent.sock"), script)
        request.addfinalizer(a.close)
        return a

    return make


def test_sync_client_retries_a_fresh_connection_closed_before_any_answer(scripted, tmp_path):
    agent = scripted(["close"])
    with Client(socket_path=str(tmp_path / "agent.sock"), timeout=5) as c:
        assert c.hello()["agent"] == "scripted"
    assert agent.connections == 2


def test_sync_client_retries_only_once(scripted, tmp_path):
    agent = scripted(["close", "close", "close"])
    with Client(socket_path=str(tmp_path / "agent.sock"), timeout=5) as c:
        with pytest.raises(AgentUnavailable, match="closed the connection"):
            c.hello()
    assert agent.connections == 2


def test_trio_client_retries_a_fresh_connection_closed_before_any_answer(scripted, tmp_path):
    agent = scripted(["close"])

    async def main():
        with trio.fail_after(10):
            async with AsyncClient(socket_path=str(tmp_path / "agent.sock"), timeout=5) as c:
                return await c.hello()

    assert trio.run(main)["agent"] == "scripted"
    assert agent.connections == 2


def test_trio_client_retries_only_once(scripted, tmp_path):
    agent = scripted(["close", "close", "close"])

    async def main():
        with trio.fail_after(10):
            async with AsyncClient(socket_path=str(tmp_path / "agent.sock"), timeout=5) as c:
                with pytest.raises(AgentUnavailable):
                    await c.hello()

    trio.run(main)
    assert agent.connections == 2
