"""Connecting: what is retried within the call's timeout, and what is not."""

import os
import socket
import threading
import time

import pytest

from softlb_client import AgentUnavailable, Client
from softlb import CLOSED, NEED_DATA, ServerConnection


def test_full_backlog_is_retried_until_the_agent_accepts(tmp_path):
    path = str(tmp_path / "bl.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)  # an agent too busy to accept: the backlog fills at once
    held = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            held.append(s)

        def serve():
            time.sleep(0.3)  # then the agent catches up
            for h in held:
                h.close()
            while True:
                conn, _ = listener.accept()
                proto = ServerConnection(1 << 20)  # the agent's own protocol object
                proto.receive_data(conn.recv(65536))
                req = proto.next_event()
                if req is NEED_DATA or req is CLOSED:  # a held connection: nothing to answer
                    conn.close()
                    continue
                conn.sendall(proto.send_result(req.id, {"version": 1}))
                conn.close()
                return

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        assert Client(socket_path=path, timeout=5).hello() == {"version": 1}
        t.join(timeout=5)
    finally:
        for h in held:
            h.close()
        listener.close()


def test_missing_socket_is_agent_unavailable(tmp_path):
    with pytest.raises(AgentUnavailable):
        Client(socket_path=os.path.join(str(tmp_path), "none.sock"), timeout=0.1).hello()
