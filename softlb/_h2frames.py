"""HTTP/2 frames (RFC 9113 4, 6): the 9-octet frame header, frame types, flags, error
codes and settings, and building frames.

One `struct` describes the header: its first 32 bits are the 24-bit length and the 8-bit
type together, then the flags, then the stream id (whose reserved top bit a reader masks
off). `H2Connection` parses frames inline with the same struct (a call per frame saved on
the proxy's hot path); `decode_frames` is the same parse as a function, for tests and tools.
"""

from __future__ import annotations

import enum
from struct import Struct

#: length << 8 | type, flags, stream id.
FRAME_HEADER = Struct(">IBL")
FRAME_HEADER_SIZE = 9
#: The client connection preface (RFC 9113 3.4), before its first SETTINGS frame.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM_ID_MASK = 0x7FFFFFFF
MAX_WINDOW = 0x7FFFFFFF
DEFAULT_WINDOW = 65535
#: SETTINGS_MAX_FRAME_SIZE's default and its allowed maximum (RFC 9113 6.5.2).
DEFAULT_MAX_FRAME = 16384
MAX_MAX_FRAME = (1 << 24) - 1

# Frame types (RFC 9113 6).
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20


class H2ErrorCode(enum.IntEnum):
    """RFC 9113 7."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class H2Setting(enum.IntEnum):
    """RFC 9113 6.5.2; other identifiers are ignored."""

    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


_SETTING = Struct(">HL")
_U32 = Struct(">L")
_GOAWAY = Struct(">LL")
_PRIORITY = Struct(">LB")


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(len(payload) << 8 | ftype, flags, stream_id) + payload


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in values.items()))


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    """The (identifier, value) pairs of a SETTINGS payload (its length a multiple of 6)."""
    return [_SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream_frame(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway_frame(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, code) + debug)


def parse_u32(payload: bytes) -> int:
    """A WINDOW_UPDATE increment or RST_STREAM code (the reserved bit left to the caller)."""
    return int(_U32.unpack(payload)[0])


def parse_goaway(payload: bytes) -> tuple[int, int, bytes]:
    last, code = _GOAWAY.unpack_from(payload)
    return last & STREAM_ID_MASK, code, payload[8:]


def parse_priority(payload: bytes) -> tuple[int, bool, int]:
    """(stream dependency, exclusive, weight) of a PRIORITY payload or HEADERS' priority part."""
    dep, weight = _PRIORITY.unpack_from(payload)
    return dep & STREAM_ID_MASK, bool(dep >> 31), weight


def decode_frames(buf: bytes) -> tuple[list[tuple[int, int, int, bytes]], bytes]:
    """The whole frames at the start of `buf` as (type, flags, stream id, payload), and the
    bytes of the incomplete one after them."""
    frames = []
    pos, n = 0, len(buf)
    while n - pos >= FRAME_HEADER_SIZE:
        lt, flags, sid = FRAME_HEADER.unpack_from(buf, pos)
        end = pos + FRAME_HEADER_SIZE + (lt >> 8)
        if end > n:
            break
        frames.append((lt & 0xFF, flags, sid & STREAM_ID_MASK, bytes(buf[pos + FRAME_HEADER_SIZE:end])))
        pos = end
    return frames, bytes(buf[pos:])
