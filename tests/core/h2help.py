"""Helpers for the HTTP/2 connection's tests: raw frames, header blocks, what was sent."""

from __future__ import annotations

from hpack import Encoder

from softlb._h2frames import (CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PREFACE,
                              RST_STREAM, decode_frames, frame, parse_goaway, parse_u32, settings_frame)
from softlb._h2connection import H2Connection

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/svc/Call"), (b":authority", b"a"),
           (b"content-type", b"application/grpc"), (b"te", b"trailers")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def block(headers, encoder=None) -> bytes:
    return (encoder or Encoder()).encode(headers)


def headers_frame(sid: int, headers=REQUEST, end_stream: bool = False, encoder=None) -> bytes:
    return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid, block(headers, encoder))


def data_frame(sid: int, data: bytes, end_stream: bool = False) -> bytes:
    return frame(DATA, END_STREAM if end_stream else 0, sid, data)


def server(**kw) -> H2Connection:
    """A server-side connection past the preface, its own output drained."""
    c = H2Connection(False, **kw)
    c.initiate()
    assert c.receive_data(PREFACE + settings_frame({})) != []
    c.data_to_send()
    return c


def client(**kw) -> H2Connection:
    c = H2Connection(True, **kw)
    c.initiate()
    c.receive_data(settings_frame({}))
    c.data_to_send()
    return c


def sent(c: H2Connection) -> list[tuple[int, int, int, bytes]]:
    frames, rest = decode_frames(c.data_to_send())
    assert rest == b""
    return frames


def resets(c: H2Connection) -> dict[int, int]:
    """RST_STREAMs sent, by stream: their codes."""
    return {sid: parse_u32(p) for t, _, sid, p in sent(c) if t == RST_STREAM}


def goaway_code(c: H2Connection) -> int | None:
    for t, _, _, p in sent(c):
        if t == GOAWAY:
            return parse_goaway(p)[1]
    return None


def continuation(sid: int, payload: bytes, last: bool) -> bytes:
    return frame(CONTINUATION, END_HEADERS if last else 0, sid, payload)
