"""The sans-I/O protocol object: bytes in, typed requests out, frames back — tested without
a socket, byte for byte against the shared wire vectors (protocol v1 is a promise)."""

import json
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softlb import (
    CLOSED,
    NEED_DATA,
    ErrorCode,
    Hello,
    Rejected,
    Report,
    Resolve,
    ServerConnection,
    Services,
    Unwatch,
    Watch,
    encode_frame,
)

VECTORS = json.loads((pathlib.Path(__file__).resolve().parents[1] / "wire_vectors" / "vectors.json").read_text())


def events(conn: ServerConnection) -> list:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA and ev is not CLOSED:
        out.append(ev)
    return out


def test_every_request_vector_becomes_a_typed_request_with_its_arguments():
    conn = ServerConnection(1 << 20)
    reqs = [v for v in VECTORS if v["kind"] == "request"]
    for v in reqs:
        conn.receive_data(bytes.fromhex(v["hex"]))
    got = events(conn)
    assert len(got) == len(reqs)
    for v, ev in zip(reqs, got):
        assert not isinstance(ev, Rejected), (v["name"], ev)
        assert ev.id == v["value"]["id"]
        op = v["value"]["op"]
        assert type(ev).__name__.lower() == op
        if op == "resolve":
            assert ev.service == v["value"]["service"]
            assert ev.lease == v["value"].get("lease", True)


def test_frames_split_anywhere_give_the_same_events():
    data = b"".join(encode_frame({"id": i, "op": "resolve", "service": "web"}) for i in range(5))
    for cut in range(1, len(data)):
        conn = ServerConnection(1 << 20)
        conn.receive_data(data[:cut])
        first = events(conn)
        conn.receive_data(data[cut:])
        assert [e.id for e in first + events(conn)] == list(range(5))


def test_bad_frames_are_rejected_and_the_stream_goes_on():
    conn = ServerConnection(1 << 20)
    conn.receive_data(encode_frame([1, 2]) + b"\x00\x00\x00\x01\xc1" + encode_frame({"id": 3, "op": "services"}))
    a, b, c = events(conn)
    assert isinstance(a, Rejected) and a.code is ErrorCode.BAD_FRAME and not a.fatal
    assert isinstance(b, Rejected) and b.code is ErrorCode.BAD_FRAME
    assert c == Services(3)


def test_a_huge_length_is_fatal():
    conn = ServerConnection(1024)
    conn.receive_data(b"\xff\xff\xff\xff")
    (ev,) = events(conn)
    assert isinstance(ev, Rejected) and ev.fatal and ev.code is ErrorCode.FRAME_TOO_LARGE


def test_requests_are_validated_into_typed_events():
    conn = ServerConnection(1 << 20)
    for msg in ({"id": 1, "op": "resolve", "service": "web", "tags": ["b", "a", "a"], "key": b"\xff"},
                {"id": 2, "op": "report", "lease": 7, "ok": False, "latency": 0.5},
                {"id": 3, "op": "hello", "versions": [1, 2], "client": "x"},
                {"id": 4, "op": "watch", "service": "web"},
                {"id": 5, "op": "unwatch", "watch": 4},
                {"id": 6, "op": "nope"},
                {"id": 7, "op": "resolve"},
                {"op": "resolve", "service": "web"}):
        conn.receive_data(encode_frame(msg))
    evs = events(conn)
    assert evs[0] == Resolve(1, "web", "\xff", ("a", "b"), True)
    assert evs[1] == Report(2, False, 0.5, 7, None, None)
    assert evs[2] == Hello(3, [1, 2])
    assert evs[3] == Watch(4, "web") and evs[4] == Unwatch(5, 4)
    assert evs[5] == Rejected(6, ErrorCode.UNKNOWN_OP, evs[5].message) and "resolve" in evs[5].message
    assert evs[6].code is ErrorCode.BAD_ARGUMENT and evs[6].id == 7
    assert evs[7].code is ErrorCode.BAD_ARGUMENT and evs[7].id is None


def test_eof_is_closed_after_the_buffered_events():
    conn = ServerConnection(1 << 20)
    conn.receive_data(encode_frame({"id": 1, "op": "services"}))
    conn.receive_data(b"")
    assert conn.next_event() == Services(1)
    assert conn.next_event() is CLOSED


def test_answers_are_the_vectors_bytes():
    by_name = {v["name"]: v for v in VECTORS}
    for v in VECTORS:
        if v["kind"] != "response":
            continue
        value = v["value"]
        if "error" in value:
            frame = ServerConnection.send_error(value["id"], ErrorCode(value["error"]["code"]), value["error"]["message"])
            assert frame.hex() == v["hex"], v["name"]
    assert by_name  # the file is not empty


@given(st.binary(max_size=300))
def test_any_bytes_give_events_never_an_exception(data):
    conn = ServerConnection(256)
    conn.receive_data(data)
    for ev in events(conn):
        assert isinstance(ev, Rejected) or hasattr(ev, "id")
        if isinstance(ev, Rejected) and ev.fatal:
            break
