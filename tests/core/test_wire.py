"""Framing: round trips, arbitrary chunking, limits, and what bad input does."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softlb import ErrorCode
from softlb._errors import RemoteProtocolError
from softlb._wire import NEED_DATA, FrameDecoder, encode_frame

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
messages = st.dictionaries(st.text(max_size=10), values, max_size=6)


def drain(dec):
    out = []
    while (m := dec.next_message()) is not NEED_DATA:
        out.append(m)
    return out


@given(st.lists(messages, max_size=8), st.data())
def test_any_chunking_yields_the_same_messages(msgs, data):
    stream = b"".join(encode_frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = FrameDecoder(max_frame=1 << 20)
    got, prev = [], 0
    for c in cuts + [len(stream)]:
        dec.feed(stream[prev:c])
        prev = c
        got += drain(dec)
    assert got == msgs
    assert dec.buffered == 0


def test_truncated_frame_waits_for_more():
    f = encode_frame({"id": 1, "op": "services"})
    dec = FrameDecoder(1024)
    dec.feed(f[:-1])
    assert dec.next_message() is NEED_DATA
    dec.feed(f[-1:])
    assert dec.next_message() == {"id": 1, "op": "services"}


def test_length_over_limit_is_fatal_before_the_body_arrives():
    dec = FrameDecoder(max_frame=100)
    dec.feed((0xFFFFFFFF).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError) as e:
        dec.next_message()
    assert e.value.code is ErrorCode.FRAME_TOO_LARGE and e.value.fatal


def test_limit_is_inclusive():
    body = msgpack.packb({"k": "x" * 90})
    dec = FrameDecoder(max_frame=len(body))
    dec.feed(len(body).to_bytes(4, "big") + body)
    assert dec.next_message() == {"k": "x" * 90}


@pytest.mark.parametrize("body", [b"\xc1", b"\x92\x01", b"\x81\x01\x02", b"\xdc\xff\xff"])
def test_bad_body_is_not_fatal_and_next_frame_decodes(body):
    # \xc1 is never-used; \x92\x01 a truncated array; \x81\x01\x02 an int map key; \xdc... a
    # huge array header with no items.
    dec = FrameDecoder(1024)
    dec.feed(len(body).to_bytes(4, "big") + body + encode_frame({"id": 2}))
    with pytest.raises(RemoteProtocolError) as e:
        dec.next_message()
    assert e.value.code is ErrorCode.BAD_FRAME and not e.value.fatal
    assert dec.next_message() == {"id": 2}


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_garbage_never_escapes_as_anything_but_protocol_errors(blob):
    dec = FrameDecoder(max_frame=32)
    dec.feed(blob)
    try:
        for _ in range(20):
            if dec.next_message() is NEED_DATA:
                break
    except RemoteProtocolError as e:
        assert e.code in (ErrorCode.BAD_FRAME, ErrorCode.FRAME_TOO_LARGE)
