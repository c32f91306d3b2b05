"""Raw protocol frames for tests that talk to the agent below the client library."""

from __future__ import annotations

import socket

import msgpack


def frame(obj) -> bytes:
    body = msgpack.packb(obj)
    return len(body).to_bytes(4, "big") + body


def read_frames(s: socket.socket, n: int) -> list:
    """Up to `n` decoded frames from `s` (fewer if it closes first)."""
    buf, out = b"", []
    while len(out) < n:
        data = s.recv(65536)
        if not data:
            break
        buf += data
        while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
            k = int.from_bytes(buf[:4], "big")
            out.append(msgpack.unpackb(buf[4:4 + k]))
            buf = buf[4 + k:]
    return out
