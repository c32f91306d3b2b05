"""The wire protocol by hand, as the driver's reference: frames and a raw blocking socket."""

from __future__ import annotations

import socket
from typing import Any

import msgpack


def frame(msg: dict[str, Any]) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def read_frame(sock: socket.socket) -> bytes:
    """One whole frame (prefix included), as the raw bytes the agent sent."""
    head = _read_exact(sock, 4)
    return head + _read_exact(sock, int.from_bytes(head, "big"))


def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise ConnectionError("the agent closed the connection")
        out += data
    return out


def decode(raw: bytes) -> dict[str, Any]:
    return msgpack.unpackb(raw[4:], raw=False)


class RawSocket:
    """A blocking Unix-socket connection sending frames as given and reading answers."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def exchange(self, raw: bytes) -> bytes:
        self.sock.sendall(raw)
        return read_frame(self.sock)

    def call(self, **req: Any) -> dict[str, Any]:
        req.setdefault("id", 1)
        return decode(self.exchange(frame(req)))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
