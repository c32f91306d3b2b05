"""Wire protocol v1 framing: a 4-byte big-endian length, then one msgpack map.

Bring-your-own-I/O, like h11: `FrameDecoder.feed(data)` takes whatever bytes arrived and
`next_message()` hands back decoded maps one at a time, or `NEED_DATA`. `encode_frame(obj)`
returns the bytes to send. Nothing here blocks or touches a socket.

Error policy:
- A length above `max_frame` is fatal (`RemoteProtocolError(FRAME_TOO_LARGE, fatal=True)`):
  we will not buffer it, so the stream can no longer be framed and must be closed.
- A frame whose body is not a msgpack map is not fatal (`BAD_FRAME`): framing is intact, the
  bad frame is consumed and the next one decodes normally.
"""

from __future__ import annotations

from typing import Any, Final

import msgpack

from ._errors import ErrorCode, RemoteProtocolError

PROTOCOL_VERSIONS: Final = (1,)
HEADER_SIZE: Final = 4


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

_packer = msgpack.Packer(use_bin_type=True)


def encode_frame(message: Any) -> bytes:
    """One complete frame. Raises TypeError for values msgpack cannot represent."""
    body = _packer.pack(message)
    return len(body).to_bytes(4, "big") + body


def decode_body(body: bytes) -> Any:
    """Decode one frame body; raises RemoteProtocolError(BAD_FRAME) on anything malformed."""
    try:
        # strict_map_key: keys must be str/bytes; raw=False: strings arrive as str.
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"frame body is not valid msgpack: {type(e).__name__}") from None


class FrameDecoder:
    """Splits a byte stream into frames and decodes each body."""

    __slots__ = ("_buf", "_pos", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_frame = max_frame

    def feed(self, data: bytes) -> None:
        if self._pos:
            # Compact lazily: dropping consumed bytes once per feed keeps next_message O(1).
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_body(self) -> bytes | _NeedData:
        """The next complete frame body as raw bytes, without decoding it."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            return NEED_DATA
        n = int.from_bytes(buf[pos : pos + 4], "big")
        if n > self.max_frame:
            raise RemoteProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame of {n} bytes exceeds the limit of {self.max_frame} bytes",
                fatal=True,
            )
        end = pos + 4 + n
        if len(buf) < end:
            return NEED_DATA
        self._pos = end
        return bytes(buf[pos + 4 : end])

    def next_message(self) -> Any:
        """The next decoded message, or NEED_DATA. Raises RemoteProtocolError."""
        body = self.next_body()
        if body is NEED_DATA:
            return NEED_DATA
        return decode_body(body)  # type: ignore[arg-type]
