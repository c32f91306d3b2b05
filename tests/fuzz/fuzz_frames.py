"""atheris target: the wire protocol's frame decoder and typed request parser (issue 10).

Input: byte 0 picks a chunk size (1..64), the rest is the byte stream a client sends. The
stream goes through `ServerConnection` in those chunks and in one piece. Properties:
* next_event never raises: bad frames and bad requests come out as `Rejected`;
* chunking changes nothing: both feeds give the same events;
* nothing grows without bound: once drained, at most one partial frame stays buffered;
* every Rejected can be answered (send_error), and decode_body of any complete frame body
  raises only RemoteProtocolError.
Rerun: python tests/fuzz/fuzz_frames.py [corpus dirs or one input file] [-runs=N]
"""

import sys

import atheris

with atheris.instrument_imports(include=["softlb"]):
    from softlb import CLOSED, NEED_DATA, RemoteProtocolError, Rejected, ServerConnection
    from softlb._wire import HEADER_SIZE, FrameDecoder, decode_body

MAX_FRAME = 512  # small, so FRAME_TOO_LARGE is in reach of short inputs


def events(chunks: list[bytes]) -> list[str]:
    conn, out = ServerConnection(MAX_FRAME), []
    for chunk in chunks + [b""]:
        conn.receive_data(chunk)
        while (ev := conn.next_event()) is not NEED_DATA:
            if ev is CLOSED:
                return out
            if isinstance(ev, Rejected):
                conn.send_error(ev.id, ev.code, ev.message)
            out.append(repr(ev))  # repr: a NaN latency compares equal as text
        assert conn.buffered < HEADER_SIZE + MAX_FRAME, conn.buffered
    raise AssertionError("EOF was fed but CLOSED never came")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    size, stream = data[0] % 64 + 1, data[1:]
    chunked = events([stream[i:i + size] for i in range(0, len(stream), size)])
    whole = events([stream])
    assert chunked == whole, (chunked, whole)
    dec = FrameDecoder(MAX_FRAME)
    dec.feed(stream)
    try:
        while (body := dec.next_body()) is not NEED_DATA:
            try:
                decode_body(body)
            except RemoteProtocolError:
                pass
    except RemoteProtocolError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
