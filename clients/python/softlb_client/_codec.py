"""Frames: a 4-byte big-endian length, then one msgpack map (docs/PROTOCOL.md §Framing)."""

from __future__ import annotations

from typing import Any

import msgpack

from ._errors import ProtocolError, SoftLBError

#: The largest answer we accept; a `watch` of a huge service is the biggest real one.
MAX_FRAME = 64 << 20

_pack = msgpack.Packer(use_bin_type=True).pack


def encode(msg: dict[str, Any]) -> bytes:
    body = _pack(msg)
    return len(body).to_bytes(4, "big") + body


class Decoder:
    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> dict[str, Any] | None:
        buf = self.buf
        if len(buf) < 4:
            return None
        n = int.from_bytes(buf[:4], "big")
        if n > MAX_FRAME:
            raise ProtocolError(f"answer frame of {n} bytes is over the limit")
        if len(buf) < 4 + n:
            return None
        body = bytes(buf[4 : 4 + n])
        del buf[: 4 + n]
        try:
            msg = msgpack.unpackb(body, raw=False)
        except Exception as e:
            raise ProtocolError(f"undecodable answer: {e}") from None
        if not isinstance(msg, dict):
            raise ProtocolError("answer is not a map")
        return msg


def result_of(msg: dict[str, Any]) -> Any:
    err = msg.get("error")
    if err is not None:
        if not isinstance(err, dict):
            raise ProtocolError(f"malformed error answer: {err!r}")
        raise SoftLBError(str(err.get("code", "UNKNOWN")), str(err.get("message", "")))
    return msg.get("result")
