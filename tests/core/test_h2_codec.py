"""The frame codec: frames round-trip, and a connection reads the same events and answers
the same bytes however its input is cut, down to one byte at a time."""

from __future__ import annotations

import struct

from hpack import Encoder
from hypothesis import given, settings
from hypothesis import strategies as st

from softlb import H2Connection
from softlb._h2frames import (DATA, END_HEADERS, END_STREAM, FRAME_HEADER_SIZE, HEADERS, PADDED, PING, PREFACE,
                              PRIORITY, PRIORITY_FLAG, decode_frames, frame, parse_settings, rst_stream_frame,
                              settings_frame, window_update_frame)
from tests.core.h2help import REQUEST, continuation

frames = st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, (1 << 31) - 1),
                            st.binary(max_size=3000)), max_size=10)


@settings(max_examples=200, deadline=None)
@given(frames, st.binary(max_size=FRAME_HEADER_SIZE - 1))
def test_frames_round_trip(fs, tail):
    data = b"".join(frame(*f) for f in fs)
    got, rest = decode_frames(data + tail)
    assert got == fs
    assert rest == tail


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.integers(0, 0xFFFF), st.integers(0, (1 << 32) - 1), max_size=8))
def test_settings_round_trip(values):
    [(_, _, _, payload)], _ = decode_frames(settings_frame(values))
    assert dict(parse_settings(payload)) == values


# A client's side of a conversation, built from pieces hypothesis picks; each piece is
# valid wherever it lands (every stream is opened by its own piece, in order).
values = st.binary(max_size=200).map(lambda b: bytes(c % 26 + 97 for c in b))
header_lists = st.lists(st.tuples(st.sampled_from([b"x-a", b"x-b", b"user-agent", b"cookie"]), values),
                        max_size=5).map(lambda extra: REQUEST + extra)
pieces = st.lists(st.tuples(st.sampled_from(["plain", "padded", "continued", "priority", "ping", "window",
                                             "unknown", "reset"]),
                            header_lists, st.binary(max_size=5000), st.integers(0, 255)),
                  min_size=1, max_size=8)


def conversation(ps) -> bytes:
    enc = Encoder()
    out = [PREFACE, settings_frame({4: 100000})]
    for i, (kind, headers, body, n) in enumerate(ps):
        sid = 1 + 2 * i
        block = enc.encode(headers)
        if kind == "continued":
            cut = len(block) // 2
            out += [frame(HEADERS, 0, sid, block[:cut]), continuation(sid, block[cut:], True)]
        elif kind == "priority":
            out.append(frame(HEADERS, END_HEADERS | PRIORITY_FLAG, sid, struct.pack(">LB", 0, n) + block))
            out.append(frame(PRIORITY, 0, sid + 100, struct.pack(">LB", sid, n)))
        else:
            out.append(frame(HEADERS, END_HEADERS, sid, block))
        if kind == "padded":
            out.append(frame(DATA, PADDED, sid, bytes([n]) + body + b"\0" * n))
        else:
            out.append(frame(DATA, 0, sid, body))
        if kind == "ping":
            out.append(frame(PING, 0, 0, bytes(8)))
        elif kind == "window":
            out.append(window_update_frame(0, n + 1))
        elif kind == "unknown":
            out.append(frame(0x20 + n % 200, n, sid, body[:50]))
        if kind == "reset":
            out.append(rst_stream_frame(sid, 8))
        else:
            out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, enc.encode([(b"grpc-status", b"0")])))
    return b"".join(out)


def run(data: bytes, cuts: list[int]) -> tuple[list, bytes]:
    c = H2Connection(False)
    c.initiate()
    events, out, prev = [], [], 0
    for cut in sorted(cuts) + [len(data)]:
        new = c.receive_data(data[prev:cut])
        for e in new:  # consumed at once: the window updates must not depend on the cuts either
            if type(e).__name__ == "DataReceived":
                c.ack_data(e.stream_id, e.flow_controlled_length)
        events += new
        out.append(c.data_to_send())
        prev = cut
    return events, b"".join(out)


@settings(max_examples=150, deadline=None)
@given(pieces, st.data())
def test_same_events_however_the_input_is_cut(ps, data):
    whole = conversation(ps)
    want_events, want_out = run(whole, [])
    assert sum(type(e).__name__ == "RequestReceived" for e in want_events) == len(ps)
    cuts = data.draw(st.lists(st.integers(0, len(whole)), max_size=40))
    assert run(whole, cuts) == (want_events, want_out)


def test_one_byte_at_a_time():
    ps = [("continued", REQUEST + [(b"x-a", b"v" * 100)], b"body" * 10, 3), ("padded", REQUEST, b"x", 7),
          ("priority", REQUEST, b"", 1), ("reset", REQUEST, b"abc", 0)]
    whole = conversation(ps)
    assert run(whole, list(range(len(whole)))) == run(whole, [])
