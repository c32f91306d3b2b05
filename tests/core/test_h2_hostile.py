"""What a hostile or broken peer gets from `H2Connection`: the RFC 9113 error, as a stream
error (RST_STREAM, the connection serves on) or a connection error (GOAWAY with the code,
`H2ConnectionError` raised), and the bounds: CONTINUATION flood, header list size
(HPACK bomb), concurrent streams, rapid reset."""

from __future__ import annotations

import struct

import pytest
from hpack import Encoder

from softlb import (DataReceived, GoawayReceived, H2Connection, H2ConnectionError, H2ErrorCode, H2StreamRefused,
                    InformationalResponseReceived, RequestReceived, ResponseReceived, StreamReset, TrailersReceived)
from softlb._h2connection import MAX_CONTINUATIONS, MAX_HEADER_BLOCK, RESET_CREDIT
from softlb._h2frames import (DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PADDED, PING, PREFACE, PRIORITY,
                              PRIORITY_FLAG, PUSH_PROMISE, RST_STREAM, SETTINGS, WINDOW_UPDATE, frame,
                              goaway_frame, rst_stream_frame, settings_frame, window_update_frame)
from tests.core.h2help import (REQUEST, RESPONSE, block, client, continuation, data_frame, goaway_code,
                               headers_frame, resets, sent, server)

E = H2ErrorCode
U32 = struct.Struct(">L")


def raw_server():
    c = H2Connection(False)
    c.initiate()
    c.data_to_send()
    return c


def connection_error(c, data: bytes, code: int) -> None:
    with pytest.raises(H2ConnectionError) as e:
        c.receive_data(data)
    assert e.value.code == code, e.value.message
    assert goaway_code(c) == code
    assert c.receive_data(headers_frame(101)) == []  # over: nothing more is read
    c.close()
    assert c.data_to_send() == b""  # and its GOAWAY was the last word


def stream_error(c, data: bytes, sid: int, code: int) -> list:
    events = c.receive_data(data)
    assert resets(c) == {sid: code}
    return events


# ------------------------------------------------------------------ connection errors

CONNECTION_ERRORS = {
    "DATA on stream 0": (data_frame(0, b"x"), E.PROTOCOL_ERROR),
    "HEADERS on stream 0": (headers_frame(0), E.PROTOCOL_ERROR),
    "DATA on an idle stream": (data_frame(7, b"x"), E.PROTOCOL_ERROR),
    "HEADERS opening an even stream": (headers_frame(2), E.PROTOCOL_ERROR),
    "frame above MAX_FRAME_SIZE": (data_frame(1, b"x" * 16385), E.FRAME_SIZE_ERROR),
    "CONTINUATION without HEADERS": (continuation(1, b"", True), E.PROTOCOL_ERROR),
    "header block interrupted": (frame(HEADERS, 0, 1, block(REQUEST)) + data_frame(1, b"x"), E.PROTOCOL_ERROR),
    "CONTINUATION on another stream": (frame(HEADERS, 0, 1, block(REQUEST)) + continuation(3, b"", True),
                                       E.PROTOCOL_ERROR),
    "undecodable HPACK": (frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"), E.COMPRESSION_ERROR),
    "HPACK table larger than HEADER_TABLE_SIZE": (frame(HEADERS, END_HEADERS, 1, b"\x3f\xe2\x1f"),
                                                  E.COMPRESSION_ERROR),
    "padding as long as the frame": (frame(DATA, PADDED, 1, b"\x05abc"), E.PROTOCOL_ERROR),
    "SETTINGS length not a multiple of 6": (frame(SETTINGS, 0, 0, b"\0" * 5), E.FRAME_SIZE_ERROR),
    "SETTINGS on a stream": (frame(SETTINGS, 0, 1, b""), E.PROTOCOL_ERROR),
    "SETTINGS ACK with a payload": (frame(SETTINGS, 1, 0, b"\0" * 6), E.FRAME_SIZE_ERROR),
    "INITIAL_WINDOW_SIZE above 2^31-1": (settings_frame({4: 1 << 31}), E.FLOW_CONTROL_ERROR),
    "MAX_FRAME_SIZE below 16384": (settings_frame({5: 100}), E.PROTOCOL_ERROR),
    "MAX_FRAME_SIZE above 2^24-1": (settings_frame({5: 1 << 24}), E.PROTOCOL_ERROR),
    "ENABLE_PUSH 2": (settings_frame({2: 2}), E.PROTOCOL_ERROR),
    "PING not 8 bytes": (frame(PING, 0, 0, b"1234567"), E.FRAME_SIZE_ERROR),
    "PING on a stream": (frame(PING, 0, 1, b"12345678"), E.PROTOCOL_ERROR),
    "RST_STREAM not 4 bytes": (headers_frame(1) + frame(RST_STREAM, 0, 1, b"\0\0\0"), E.FRAME_SIZE_ERROR),
    "RST_STREAM on stream 0": (rst_stream_frame(0, 8), E.PROTOCOL_ERROR),
    "RST_STREAM on an idle stream": (rst_stream_frame(5, 8), E.PROTOCOL_ERROR),
    "WINDOW_UPDATE of 0 on the connection": (window_update_frame(0, 0), E.PROTOCOL_ERROR),
    "connection window above 2^31-1": (window_update_frame(0, (1 << 31) - 1), E.FLOW_CONTROL_ERROR),
    "WINDOW_UPDATE on an idle stream": (window_update_frame(9, 1), E.PROTOCOL_ERROR),
    "WINDOW_UPDATE not 4 bytes": (frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0\0"), E.FRAME_SIZE_ERROR),
    "PRIORITY on stream 0": (frame(PRIORITY, 0, 0, b"\0\0\0\1\x10"), E.PROTOCOL_ERROR),
    "PUSH_PROMISE to a server": (frame(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\2"), E.PROTOCOL_ERROR),
    "GOAWAY on a stream": (frame(GOAWAY, 0, 1, b"\0" * 8), E.PROTOCOL_ERROR),
    "GOAWAY shorter than 8 bytes": (frame(GOAWAY, 0, 0, b"\0" * 7), E.FRAME_SIZE_ERROR),
    "HEADERS too short for its priority": (frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, b"\0\0"),
                                           E.FRAME_SIZE_ERROR),
}


@pytest.mark.parametrize("case", list(CONNECTION_ERRORS))
def test_connection_errors(case):
    data, code = CONNECTION_ERRORS[case]
    connection_error(server(), data, code)


def test_no_preface_is_a_protocol_error_at_once():
    c = raw_server()
    connection_error(c, b"GET / HTTP/1.1\r\n", E.PROTOCOL_ERROR)


def test_first_frame_not_settings_is_a_protocol_error():
    c = raw_server()
    connection_error(c, PREFACE + frame(PING, 0, 0, b"12345678"), E.PROTOCOL_ERROR)


def test_data_after_the_stream_ended_both_ways_is_stream_closed():
    c = server()
    c.receive_data(headers_frame(1, end_stream=True))
    c.send_headers(1, RESPONSE, end_stream=True)
    c.data_to_send()
    assert 1 not in c.streams
    connection_error(c, data_frame(1, b"late"), E.STREAM_CLOSED)


def test_data_beyond_the_connection_window_is_a_flow_control_error():
    c = server(initial_window=1 << 20)  # the stream allows more than the connection's 65535
    c.receive_data(headers_frame(1))
    chunk = b"x" * 16384
    c.receive_data(data_frame(1, chunk) * 3 + data_frame(1, chunk[:16383]))  # 65535: exactly the window
    connection_error(c, data_frame(1, b"y"), E.FLOW_CONTROL_ERROR)


def test_client_refuses_enable_push_and_response_without_status():
    c = client()
    connection_error(c, settings_frame({2: 1}), E.PROTOCOL_ERROR)
    c = client()
    c.send_headers(1, REQUEST, end_stream=True)
    c.data_to_send()
    events = stream_error(c, headers_frame(1, [(b"content-type", b"x")]), 1, E.PROTOCOL_ERROR)
    assert events == [StreamReset(1, E.PROTOCOL_ERROR, False)]


def test_client_refuses_a_stream_the_server_opens():
    c = client()
    connection_error(c, headers_frame(2, RESPONSE), E.PROTOCOL_ERROR)


def test_client_data_before_the_response_is_a_stream_error():
    c = client()
    c.send_headers(1, REQUEST, end_stream=True)
    c.data_to_send()
    stream_error(c, data_frame(1, b"x"), 1, E.PROTOCOL_ERROR)


def test_client_informational_then_final_then_trailers():
    c = client()
    c.send_headers(1, REQUEST, end_stream=True)
    c.data_to_send()
    e = Encoder()
    events = c.receive_data(headers_frame(1, [(b":status", b"103")], encoder=e)
                            + headers_frame(1, RESPONSE, encoder=e) + data_frame(1, b"ab")
                            + headers_frame(1, [(b"grpc-status", b"0")], end_stream=True, encoder=e))
    assert [type(x) for x in events] == [InformationalResponseReceived, ResponseReceived, DataReceived,
                                         TrailersReceived]
    assert 1 not in c.streams


# ------------------------------------------------------------------ stream errors

def test_data_after_end_stream_is_stream_closed_and_the_connection_serves_on():
    c = server()
    c.receive_data(headers_frame(1, end_stream=True))
    events = stream_error(c, data_frame(1, b"x"), 1, E.STREAM_CLOSED)
    assert events == [StreamReset(1, E.STREAM_CLOSED, False)]
    assert [type(x) for x in c.receive_data(headers_frame(3, encoder=None))] == [RequestReceived]


def test_data_beyond_the_stream_window_is_a_stream_error():
    c = server(initial_window=100)
    c.receive_data(headers_frame(1))
    stream_error(c, data_frame(1, b"x" * 101), 1, E.FLOW_CONTROL_ERROR)


def test_frames_after_the_peers_reset_are_stream_closed():
    c = server()
    c.receive_data(headers_frame(1) + rst_stream_frame(1, E.CANCEL))
    stream_error(c, data_frame(1, b"x"), 1, E.STREAM_CLOSED)


def test_frames_in_flight_after_our_reset_are_ignored_and_their_window_given_back():
    c = server()
    c.receive_data(headers_frame(1))
    assert c.reset_stream(1, E.CANCEL)
    assert c.reset_stream(1, E.CANCEL) is False  # once only
    sent(c)
    for _ in range(3):
        assert c.receive_data(data_frame(1, b"x" * 16000)) == []
    # 48000 bytes nobody consumes went back to the peer (half the 65535 window is the threshold)
    frames = sent(c)
    assert [(t, sid) for t, _, sid, _ in frames] == [(WINDOW_UPDATE, 0)]
    assert U32.unpack(frames[0][3])[0] == 48000


def test_trailers_without_end_stream_are_a_stream_error():
    c = server()
    e = Encoder()
    c.receive_data(headers_frame(1, encoder=e))
    stream_error(c, headers_frame(1, [(b"x", b"y")], encoder=e), 1, E.PROTOCOL_ERROR)


def test_window_update_of_0_or_overflowing_on_a_stream_is_a_stream_error():
    c = server()
    c.receive_data(headers_frame(1) + headers_frame(3))
    stream_error(c, window_update_frame(1, 0), 1, E.PROTOCOL_ERROR)
    stream_error(c, window_update_frame(3, (1 << 31) - 1), 3, E.FLOW_CONTROL_ERROR)


def test_priority_on_itself_and_bad_priority_length():
    c = server()
    stream_error(c, frame(PRIORITY, 0, 1, U32.pack(1) + b"\x10"), 1, E.PROTOCOL_ERROR)
    stream_error(c, frame(PRIORITY, 0, 3, b"\0\0\0\1"), 3, E.FRAME_SIZE_ERROR)
    c = server()
    stream_error(c, frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 5, U32.pack(5) + b"\x10" + block(REQUEST)),
                 5, E.PROTOCOL_ERROR)


def test_priority_padding_and_unknown_frames_are_parsed_and_ignored():
    c = server()
    body = block(REQUEST)
    events = c.receive_data(frame(0xFA, 0xFF, 0, b"anything")
                            + frame(PRIORITY, 0, 9, U32.pack(1) + b"\x10")
                            + frame(HEADERS, END_HEADERS | PRIORITY_FLAG | PADDED, 1,
                                    b"\x03" + U32.pack(0) + b"\x10" + body + b"\0\0\0")
                            + frame(DATA, PADDED | END_STREAM, 1, b"\x02hi\0\0"))
    assert events == [RequestReceived(1, REQUEST, False), DataReceived(1, b"hi", 5, True)]


def test_initial_window_size_changes_move_open_streams_windows():
    c = client()
    c.send_headers(1, REQUEST)
    c.send_data(1, b"x" * 1000)
    assert c.send_window(1) == 65535 - 1000
    c.receive_data(settings_frame({4: 1000}))  # windows may go negative (RFC 9113 6.9.2)
    assert c.send_window(1) == 0 and c.streams[1].send_window == 0
    c.receive_data(settings_frame({4: 500}))
    assert c.streams[1].send_window == -500 and c.send_window(1) == 0  # nothing may go
    c.receive_data(window_update_frame(1, 600))
    assert c.send_window(1) == 100


# ------------------------------------------------------------------ bounds

def test_continuation_flood_of_empty_frames_is_cut():
    c = server()
    data = frame(HEADERS, 0, 1, block(REQUEST)) + continuation(1, b"", False) * (MAX_CONTINUATIONS + 1)
    connection_error(c, data, E.ENHANCE_YOUR_CALM)


def test_header_block_larger_than_the_bound_is_cut_before_decoding():
    c = server()
    data = frame(HEADERS, 0, 1, b"\0" * 16384) + b"".join(continuation(1, b"\0" * 16384, False) for _ in range(4))
    assert len(data) > MAX_HEADER_BLOCK
    connection_error(c, data, E.ENHANCE_YOUR_CALM)


def test_a_large_block_in_continuations_within_the_bounds_is_accepted():
    c = server()
    headers = REQUEST + [(b"x-big", b"v" * 30000)]
    b = block(headers)
    data = frame(HEADERS, 0, 1, b[:10]) + continuation(1, b[10:16000], False) + continuation(1, b[16000:], True)
    assert c.receive_data(data) == [RequestReceived(1, headers, False)]


def test_hpack_bomb_stops_at_the_header_list_size():
    c = server()
    # one 4000-byte value indexed once, then referenced 100 times: 400 KB from a few hundred bytes
    e = Encoder()
    first = e.encode(REQUEST + [(b"x-bomb", b"b" * 4000)])
    c.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, first))
    index = 62  # the newest dynamic entry
    bomb = bytes([0x80 | index]) * 100
    connection_error(c, frame(HEADERS, END_HEADERS, 3, bomb), E.ENHANCE_YOUR_CALM)


def test_streams_beyond_max_concurrent_streams_are_refused():
    c = server(max_concurrent_streams=2)
    events = c.receive_data(headers_frame(1) + headers_frame(3) + headers_frame(5))
    assert [e.stream_id for e in events] == [1, 3]
    assert resets(c) == {5: E.REFUSED_STREAM}
    c.receive_data(rst_stream_frame(1, E.CANCEL))
    assert [type(e) for e in c.receive_data(headers_frame(7))] == [RequestReceived]


def test_rapid_reset_closes_the_connection():
    c = server()
    e = Encoder()
    with pytest.raises(H2ConnectionError) as err:
        for i in range(RESET_CREDIT + 1):
            sid = 1 + 2 * i
            c.receive_data(headers_frame(sid, encoder=e) + rst_stream_frame(sid, E.CANCEL))
    assert err.value.code == E.ENHANCE_YOUR_CALM
    assert i == RESET_CREDIT


def test_resets_among_completed_streams_are_no_rapid_reset():
    c = server()
    e = Encoder()
    for i in range(3 * RESET_CREDIT):
        sid = 1 + 2 * i
        if i % 2:
            c.receive_data(headers_frame(sid, encoder=e) + rst_stream_frame(sid, E.CANCEL))
        else:
            c.receive_data(headers_frame(sid, end_stream=True, encoder=e))
            c.send_headers(sid, RESPONSE, end_stream=True)
    assert not c.terminated


def test_streams_after_our_goaway_are_ignored_and_earlier_ones_finish():
    c = server()
    e = Encoder()
    c.receive_data(headers_frame(1, encoder=e))
    c.close(last_stream_id=1)
    assert [t for t, *_ in sent(c)] == [GOAWAY]
    assert c.receive_data(headers_frame(3, encoder=e) + data_frame(3, b"x")) == []
    events = c.receive_data(data_frame(1, b"body", end_stream=True))
    assert events == [DataReceived(1, b"body", 4, True)]
    c.send_headers(1, RESPONSE, end_stream=True)
    assert [t for t, *_ in sent(c)] == [HEADERS]


def test_goaway_received_refuses_our_streams_above_its_last_id():
    c = client()
    for sid in (1, 3, 5):
        c.send_headers(sid, REQUEST)
    events = c.receive_data(goaway_frame(1, E.NO_ERROR))
    assert events == [GoawayReceived(1, E.NO_ERROR, b""), StreamReset(3, E.REFUSED_STREAM, True),
                      StreamReset(5, E.REFUSED_STREAM, True)]
    with pytest.raises(H2StreamRefused):
        c.send_headers(7, REQUEST)
    c.send_data(1, b"still open", end_stream=True)


def test_ping_is_acknowledged():
    c = server()
    c.receive_data(frame(PING, 0, 0, b"12345678"))
    assert sent(c) == [(PING, 1, 0, b"12345678")]


def test_end_stream_data_after_headers_flag():
    c = server()
    events = c.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, block(REQUEST)))
    assert events == [RequestReceived(1, REQUEST, True)]


# ------------------------------------------------------------------ anything at all

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

random_frames = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5, 7, 99]),
                                   st.binary(max_size=64)), max_size=25)


@settings(max_examples=500, deadline=None)
@given(st.booleans(), random_frames, st.data())
def test_any_frames_give_events_or_a_connection_error_never_a_crash(client_side, frames, data):
    """Random frames (types, flags, stream ids, payloads), each side: the connection
    returns events or raises H2ConnectionError with a GOAWAY queued; nothing else."""
    c = client() if client_side else server()
    if data.draw(st.booleans()):  # a stream open on each side's terms first
        if client_side:
            c.send_headers(1, REQUEST)
        else:
            c.receive_data(headers_frame(1))
        c.data_to_send()
    wire = b"".join(frame(*f) for f in frames)
    try:
        for cut in (len(wire) // 3, len(wire)):
            c.receive_data(wire[:cut])
            wire = wire[cut:]
            for sid in list(c.streams):  # the caller's side of things keeps working too
                c.send_window(sid)
                c.ack_data(sid, 10)
    except H2ConnectionError:
        assert goaway_code(c) is not None
    else:
        sent(c)  # whatever it queued is well-formed frames


def test_the_peers_max_concurrent_streams_is_honoured():
    c = client()
    c.receive_data(settings_frame({3: 1}))
    c.send_headers(1, REQUEST)
    with pytest.raises(H2StreamRefused):
        c.send_headers(3, REQUEST)
    c.receive_data(rst_stream_frame(1, E.CANCEL))  # one ends: room for the next
    c.send_headers(3, REQUEST)


def test_closed_streams_are_remembered_within_the_bound_and_forgotten_beyond():
    from softlb._h2connection import CLOSED_REMEMBERED
    c = server()
    e = Encoder()
    for i in range(3 * CLOSED_REMEMBERED):
        sid = 1 + 2 * i
        c.receive_data(headers_frame(sid, end_stream=True, encoder=e))
        c.send_headers(sid, RESPONSE, end_stream=True)
        c.data_to_send()
    assert len(c._closed) + len(c._closed_before) <= CLOSED_REMEMBERED
    last = 1 + 2 * (3 * CLOSED_REMEMBERED - 1)
    connection_error(c, data_frame(last, b"late"), E.STREAM_CLOSED)  # recent: known to have ended
    c = server()
    c.receive_data(headers_frame(1, end_stream=True))
    c.send_headers(1, RESPONSE, end_stream=True)
    for i in range(1, CLOSED_REMEMBERED + 1):
        sid = 1 + 2 * i
        c.receive_data(headers_frame(sid, end_stream=True))
        c.reset_stream(sid)
    sent(c)
    stream_error(c, data_frame(1, b"late"), 1, E.STREAM_CLOSED)  # forgotten: a stream error only
