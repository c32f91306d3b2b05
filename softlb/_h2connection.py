"""A sans-I/O HTTP/2 connection (RFC 9113), either side: bytes in, events out; calls that
send headers, data, resets, GOAWAY and window updates queue bytes for `data_to_send`.

Why our own rather than the h2 library: the http2 proxy puts ~9 frames through two
connections per gRPC call, and h2's frame objects, event machinery and per-frame state
machine transitions were ~65% of the proxy's CPU per call (docs/BENCHMARKS.md). Here a
frame is parsed with one `struct` call and dispatched on its type, a stream is a small
record (two windows, two "closed" flags, how many header blocks it received), and events
are slotted records. HPACK decoding is the `hpack` library's, behind a cache of repeated
blocks (`_hpack_decode`); encoding is the static-table encoder (`_hpack_static`), which
never uses the dynamic table.

Only what a proxy needs, all of it per the RFC for both roles: no server push (a client
sends ENABLE_PUSH=0; PUSH_PROMISE is a PROTOCOL_ERROR either way), priorities parsed and
ignored, no CONNECT-specific rules. Headers are not checked here beyond what the framing
needs (a response head must carry `:status`; trailers must end the stream); the proxy
checks a client's request itself (agent/proxy/h2headers.py).

Stream life (RFC 9113 5.1), kept as two flags: a stream exists from its first HEADERS
until both sides sent END_STREAM, or either reset it. A closed stream is remembered
(bounded) with how it closed, because that decides what a late frame is:
  - reset here: frames the peer sent before it saw our RST_STREAM are ignored (DATA still
    counts against the connection's window, and is given back);
  - reset by the peer: anything but PRIORITY/WINDOW_UPDATE/RST_STREAM is a stream error
    STREAM_CLOSED;
  - ended by both END_STREAMs: DATA or HEADERS is a connection error STREAM_CLOSED;
  - forgotten: a stream error STREAM_CLOSED.
Frames other than HEADERS and PRIORITY on an idle stream are a connection error.

Flow control: data is sent only within the peer's windows (`send_window`; more raises
`H2FlowControlBlocked`); the caller tells `ack_data` what it consumed, and WINDOW_UPDATEs
go out once half a window is consumed, so a steady stream of small messages costs no
window frames at all. A peer sending beyond our windows is a FLOW_CONTROL_ERROR.

Bounds, because one agent serves every process on the host (docs/PROXY.md lists them):
MAX_HEADER_BLOCK and MAX_CONTINUATIONS (CONTINUATION flood), the decoded header list size
(`max_header_list_size`, advertised and enforced while decoding, so an HPACK bomb stops
early), MAX_CONCURRENT_STREAMS (excess streams refused), and a reset credit against rapid
reset (CVE-2023-44487; `RESET_CREDIT`).
"""

from __future__ import annotations

from typing import Any, Iterable

from hpack.exceptions import HPACKError, OversizedHeaderListError

from ._h2events import (DataReceived, GoawayReceived, H2ConnectionError, H2FlowControlBlocked,
                        H2StreamClosedError, H2StreamRefused, InformationalResponseReceived, PingAcknowledged,
                        RemoteSettingsChanged, RequestReceived, ResponseReceived, StreamReset, TrailersReceived,
                        WindowUpdated)
from ._h2frames import (ACK, CONTINUATION, DATA, DEFAULT_MAX_FRAME, DEFAULT_WINDOW, END_HEADERS, END_STREAM,
                        FRAME_HEADER, FRAME_HEADER_SIZE, GOAWAY, HEADERS, MAX_MAX_FRAME, MAX_WINDOW, PADDED, PING,
                        PREFACE, PRIORITY, PRIORITY_FLAG, PUSH_PROMISE, RST_STREAM, SETTINGS, STREAM_ID_MASK,
                        WINDOW_UPDATE, H2ErrorCode, H2Setting, frame, goaway_frame, parse_goaway, parse_priority,
                        parse_settings, parse_u32, rst_stream_frame, settings_frame, window_update_frame)
from ._hpack_decode import BlockDecoder
from ._hpack_static import StaticEncoder

#: Encoded header block, HEADERS and its CONTINUATIONs together: a peer must not make us
#: hold more than this before the block can be decoded (and checked against the list size).
MAX_HEADER_BLOCK = 64 * 1024
#: CONTINUATION frames in one block: empty ones cost work without growing the block.
MAX_CONTINUATIONS = 32
#: Decoded header list size (RFC 9113 6.5.2), advertised as MAX_HEADER_LIST_SIZE: h2's
#: default, eight times gRPC's default metadata limit.
MAX_HEADER_LIST = 64 * 1024
#: MAX_CONCURRENT_STREAMS advertised; a peer opening more gets REFUSED_STREAM.
MAX_STREAMS = 1000
#: Rapid reset (CVE-2023-44487) without a clock: each stream the peer opens and resets
#: (or opens beyond MAX_CONCURRENT_STREAMS) spends one credit, each it completes earns
#: one back, up to this; a peer out of credit has its connection closed (ENHANCE_YOUR_CALM).
#: So resets can outnumber completed streams by at most this much, at any rate.
RESET_CREDIT = 200
#: Frames sent are at most this, whatever MAX_FRAME_SIZE the peer allows: h2 (so
#: hypercorn, a Python upstream) accepts a larger frame only in a read after the one that
#: carried our SETTINGS ACK, and on loopback larger frames save little.
SEND_FRAME_MAX = DEFAULT_MAX_FRAME
#: Closed streams remembered (how they closed decides what a late frame means).
CLOSED_REMEMBERED = 1024

_ENDED, _RESET_HERE, _RESET_THERE = 1, 2, 3
_MASK = STREAM_ID_MASK
_DECODE_ERRORS = (HPACKError, ValueError, IndexError, UnicodeDecodeError)


class _Stream:
    __slots__ = ("send_window", "recv_window", "unacked", "local_closed", "remote_closed", "heads")

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_window = send_window
        self.recv_window = recv_window
        #: Received bytes consumed by the caller and not yet returned in a WINDOW_UPDATE.
        self.unacked = 0
        self.local_closed = False
        self.remote_closed = False
        #: Header blocks received, 1xx heads not counted: 1 = head, 2 = trailers.
        self.heads = 0


class H2Connection:
    """One HTTP/2 connection. `client_side` opens streams (odd ids); the other side answers.

    Use: `initiate()` once, then `receive_data(bytes) -> events` and the `send_*` calls in
    any order, and send `data_to_send()` after each. `receive_data` raises
    `H2ConnectionError` for the peer's connection errors (a GOAWAY is queued; the
    connection is over); the `send_*` calls raise `H2UsageError` kinds."""

    def __init__(self, client_side: bool, *, initial_window: int = DEFAULT_WINDOW,
                 connection_window: int = DEFAULT_WINDOW, max_concurrent_streams: int = MAX_STREAMS,
                 max_header_list_size: int = MAX_HEADER_LIST, header_table_size: int = 4096,
                 max_frame_size: int = DEFAULT_MAX_FRAME, reset_credit: int = RESET_CREDIT) -> None:
        self.client_side = client_side
        #: Open and half-closed streams by id.
        self.streams: dict[int, _Stream] = {}
        #: How closed streams closed, by id: the newer half and the older half (see _remember).
        self._closed: dict[int, int] = {}
        self._closed_before: dict[int, int] = {}
        self._out: list[Any] = []
        self._buf = b""
        self._await_preface = not client_side
        self._await_settings = True
        self.next_stream_id = 1 if client_side else 2
        self._peer_parity = 0 if client_side else 1
        self._last_peer_sid = 0
        self.terminated = False
        # What this side promised.
        self.local_initial_window = initial_window
        self.local_max_streams = max_concurrent_streams
        self.local_max_frame = max_frame_size
        self.max_header_list_size = max_header_list_size
        self._header_table_size = header_table_size
        self._conn_target = connection_window
        self._recv_window = DEFAULT_WINDOW
        self._conn_unacked = 0
        # What the peer promised (RFC 9113 6.5.2 defaults until its SETTINGS).
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_streams = 1 << 31
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.send_frame_max = DEFAULT_MAX_FRAME
        self.peer_header_table_size = 4096
        self.peer_max_header_list_size = 1 << 31
        self._send_window = DEFAULT_WINDOW
        # A header block in pieces (HEADERS without END_HEADERS, then CONTINUATIONs).
        self._cont_sid = 0
        self._cont_end = False
        self._cont_bad_priority = False
        self._cont_block: list[bytes] = []
        self._cont_size = 0
        self._cont_frames = 0
        self.decoder = BlockDecoder(max_header_list_size, header_table_size)
        self.encoder = StaticEncoder()
        self.goaway_sent: int | None = None
        self.goaway_received: int | None = None
        self._credit = self._credit_max = reset_credit

    # ------------------------------------------------------------------ sending

    def initiate(self) -> None:
        """Queue the preface (client) and this side's SETTINGS and connection window."""
        settings = {H2Setting.MAX_CONCURRENT_STREAMS: self.local_max_streams,
                    H2Setting.INITIAL_WINDOW_SIZE: self.local_initial_window,
                    H2Setting.MAX_HEADER_LIST_SIZE: self.max_header_list_size}
        if self.client_side:
            self._out.append(PREFACE)
            settings[H2Setting.ENABLE_PUSH] = 0
        if self._header_table_size != 4096:
            settings[H2Setting.HEADER_TABLE_SIZE] = self._header_table_size
        if self.local_max_frame != DEFAULT_MAX_FRAME:
            settings[H2Setting.MAX_FRAME_SIZE] = self.local_max_frame
        self._out.append(settings_frame(settings))
        if self._conn_target > DEFAULT_WINDOW:
            self._out.append(window_update_frame(0, self._conn_target - DEFAULT_WINDOW))
            self._recv_window = self._conn_target

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        return data

    def send_headers(self, stream_id: int, headers: Iterable[tuple[bytes, bytes]], end_stream: bool = False) -> None:
        """A head (client side: `stream_id` == `next_stream_id` opens the stream) or, later,
        trailers (with `end_stream`)."""
        st = self.streams.get(stream_id)
        if st is None:
            if not self.client_side or stream_id != self.next_stream_id or self.terminated:
                raise H2StreamClosedError(f"stream {stream_id} is not open")
            if self.goaway_received is not None:
                raise H2StreamRefused("the peer sent GOAWAY: no new streams")
            if len(self.streams) >= self.peer_max_streams:
                raise H2StreamRefused(f"the peer allows {self.peer_max_streams} concurrent streams")
            if stream_id > _MASK:
                raise H2StreamRefused("stream ids exhausted")
            st = self.streams[stream_id] = _Stream(self.peer_initial_window, self.local_initial_window)
            self.next_stream_id += 2
        elif st.local_closed:
            raise H2StreamClosedError(f"stream {stream_id} already ended")
        block = self.encoder.encode(headers)
        flags = END_STREAM if end_stream else 0
        limit = self.send_frame_max
        if len(block) <= limit:
            self._out.append(FRAME_HEADER.pack(len(block) << 8 | HEADERS, flags | END_HEADERS, stream_id))
            self._out.append(block)
        else:
            pieces = [block[i:i + limit] for i in range(0, len(block), limit)]
            self._out.append(frame(HEADERS, flags, stream_id, pieces[0]))
            for i, p in enumerate(pieces[1:], start=2):
                self._out.append(frame(CONTINUATION, END_HEADERS if i == len(pieces) else 0, stream_id, p))
        if end_stream:
            self._end_local(stream_id, st)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """`data` within `send_window(stream_id)`, cut into frames the peer accepts."""
        st = self.streams.get(stream_id)
        if st is None or st.local_closed:
            raise H2StreamClosedError(f"stream {stream_id} is not open for sending")
        n = len(data)
        if n > st.send_window or n > self._send_window:
            raise H2FlowControlBlocked(f"{n} bytes on stream {stream_id} beyond the peer's window "
                                       f"({min(st.send_window, self._send_window)})")
        st.send_window -= n
        self._send_window -= n
        out = self._out
        limit = self.send_frame_max
        if n <= limit:
            out.append(FRAME_HEADER.pack(n << 8, END_STREAM if end_stream else 0, stream_id))
            if n:
                out.append(data)
        else:
            view = memoryview(data)
            for off in range(0, n, limit):
                piece = view[off:off + limit]
                last = off + limit >= n
                out.append(FRAME_HEADER.pack(len(piece) << 8, END_STREAM if last and end_stream else 0, stream_id))
                out.append(piece)
        if end_stream:
            self._end_local(stream_id, st)

    def send_window(self, stream_id: int) -> int:
        """How much data `send_data` takes on the stream now (0 when it is not open). A
        stream's window itself may be below 0: a SETTINGS lowering INITIAL_WINDOW_SIZE takes
        the difference from windows already spent (RFC 9113 6.9.2); it then takes nothing
        until WINDOW_UPDATEs bring it back above 0."""
        st = self.streams.get(stream_id)
        if st is None or st.local_closed:
            return 0
        w = st.send_window
        if self._send_window < w:
            w = self._send_window
        return w if w > 0 else 0

    def reset_stream(self, stream_id: int, code: int = H2ErrorCode.CANCEL) -> bool:
        """RST_STREAM an open stream; False (nothing sent) when it is already over."""
        if self.streams.pop(stream_id, None) is None:
            return False
        self._remember(stream_id, _RESET_HERE)
        self._out.append(rst_stream_frame(stream_id, code))
        return True

    def ack_data(self, stream_id: int, n: int) -> bool:
        """`n` received bytes (`DataReceived.flow_controlled_length`) were consumed: the
        peer may send them again, on the connection and on the stream if still open.
        True when that queued a WINDOW_UPDATE (most calls queue nothing)."""
        if n <= 0 or self.terminated:
            return False
        queued = len(self._out)
        self._give_back(n)
        st = self.streams.get(stream_id)
        if st is not None and not st.remote_closed:
            u = st.unacked + n
            if u >= self.local_initial_window >> 1:
                st.recv_window += u
                self._out.append(window_update_frame(stream_id, u))
                u = 0
            st.unacked = u
        return len(self._out) > queued

    def close(self, code: int = H2ErrorCode.NO_ERROR, last_stream_id: int | None = None, debug: bytes = b"") -> None:
        """GOAWAY: the peer opens no new stream; its streams up to `last_stream_id`
        (default: the last it opened) may finish, later ones are ignored."""
        if self.terminated and self.goaway_sent is not None:
            return  # the GOAWAY saying why the connection failed was the last word
        last = self._last_peer_sid if last_stream_id is None else last_stream_id
        if self.goaway_sent is not None and self.goaway_sent < last:
            last = self.goaway_sent
        self.goaway_sent = last
        self._out.append(goaway_frame(last, code, debug))

    def ping(self, data: bytes = b"\0" * 8) -> None:
        self._out.append(frame(PING, 0, 0, data))

    def open_streams(self) -> int:
        return len(self.streams)

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> list[Any]:
        if self.terminated:
            return []
        buf = self._buf + data if self._buf else data
        events: list[Any] = []
        pos = 0
        try:
            if self._await_preface:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(buf):
                        raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "no HTTP/2 connection preface")
                    self._buf = buf
                    return events
                if not buf.startswith(PREFACE):
                    raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "no HTTP/2 connection preface")
                pos = len(PREFACE)
                self._await_preface = False
            n = len(buf)
            unpack = FRAME_HEADER.unpack_from
            while n - pos >= FRAME_HEADER_SIZE:
                lt, flags, sid = unpack(buf, pos)
                length = lt >> 8
                if length > self.local_max_frame:
                    raise H2ConnectionError(H2ErrorCode.FRAME_SIZE_ERROR,
                                            f"frame of {length} bytes, above {self.local_max_frame}")
                end = pos + FRAME_HEADER_SIZE + length
                if end > n:
                    break
                payload = buf[pos + FRAME_HEADER_SIZE:end]
                pos = end
                ftype = lt & 0xFF
                sid &= _MASK
                if self._cont_sid and ftype != CONTINUATION:
                    raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "header block interrupted by another frame")
                if self._await_settings:
                    if ftype != SETTINGS or flags & ACK:
                        raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "the first frame is not SETTINGS")
                    self._await_settings = False
                if ftype == DATA:
                    self._data(flags, sid, payload, events)
                elif ftype == HEADERS:
                    self._headers(flags, sid, payload, events)
                elif ftype < len(_HANDLERS):
                    _HANDLERS[ftype](self, flags, sid, payload, events)
                # Unknown frame types are ignored (RFC 9113 4.1, 5.5).
            self._buf = buf[pos:] if pos < n else b""
        except H2ConnectionError as e:
            self.terminated = True
            self._buf = b""
            self.close(e.code, debug=e.message.encode()[:256])
            raise
        return events

    def _data(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if sid == 0:
            raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        data = _unpad(payload) if flags & PADDED else payload
        if flow > self._recv_window:
            raise H2ConnectionError(H2ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        self._recv_window -= flow
        st = self.streams.get(sid)
        if st is None or st.remote_closed:
            self._give_back(flow)  # nobody will consume it
            self._not_open(sid, "DATA", events)
            return
        if flow > st.recv_window:
            self._give_back(flow)
            self._stream_error(sid, H2ErrorCode.FLOW_CONTROL_ERROR, events)
            return
        if st.heads == 0 and self.client_side:
            self._give_back(flow)
            self._stream_error(sid, H2ErrorCode.PROTOCOL_ERROR, events)  # DATA before the response
            return
        st.recv_window -= flow
        end = flags & END_STREAM
        if end:
            st.remote_closed = True
            if st.local_closed:
                self._ended(sid)
        events.append(DataReceived(sid, data, flow, end != 0))

    def _headers(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if sid == 0:
            raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            payload = _unpad(payload)
        bad_priority = False
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise H2ConnectionError(H2ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            bad_priority = parse_priority(payload)[0] == sid
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(sid, flags & END_STREAM != 0, payload, bad_priority, events)
            return
        if len(payload) > MAX_HEADER_BLOCK:
            raise H2ConnectionError(H2ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        self._cont_sid = sid
        self._cont_end = flags & END_STREAM != 0
        self._cont_bad_priority = bad_priority
        self._cont_block = [payload]
        self._cont_size = len(payload)
        self._cont_frames = 0

    def _continuation(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if sid != self._cont_sid or sid == 0:
            raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "CONTINUATION outside a header block")
        self._cont_size += len(payload)
        self._cont_frames += 1
        if self._cont_size > MAX_HEADER_BLOCK:
            raise H2ConnectionError(H2ErrorCode.ENHANCE_YOUR_CALM,
                                    f"header block larger than {MAX_HEADER_BLOCK} bytes")
        if self._cont_frames > MAX_CONTINUATIONS:
            raise H2ConnectionError(H2ErrorCode.ENHANCE_YOUR_CALM,
                                    f"more than {MAX_CONTINUATIONS} CONTINUATION frames in a header block")
        self._cont_block.append(payload)
        if flags & END_HEADERS:
            block = b"".join(self._cont_block)
            self._cont_sid = 0
            self._cont_block = []
            self._header_block(sid, self._cont_end, block, self._cont_bad_priority, events)

    def _header_block(self, sid: int, end: bool, block: bytes, bad_priority: bool, events: list[Any]) -> None:
        # Decoded first, whatever happens to the stream: the HPACK state is the connection's.
        try:
            headers = self.decoder.decode(block)
        except OversizedHeaderListError:
            raise H2ConnectionError(H2ErrorCode.ENHANCE_YOUR_CALM,
                                    f"header list larger than {self.max_header_list_size} bytes") from None
        except _DECODE_ERRORS as e:
            raise H2ConnectionError(H2ErrorCode.COMPRESSION_ERROR, f"undecodable header block: {e}") from None
        st = self.streams.get(sid)
        if st is None:
            if sid in self._closed or sid in self._closed_before or not self._idle(sid):
                self._not_open(sid, "HEADERS", events)
                return
            if self.client_side or sid & 1 != self._peer_parity:
                raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, f"stream {sid} opened by the wrong side")
            self._last_peer_sid = sid
            if self.goaway_sent is not None and sid > self.goaway_sent:
                self._remember(sid, _RESET_HERE)  # after our GOAWAY: ignored (RFC 9113 6.8)
                return
            if len(self.streams) >= self.local_max_streams:
                self._stream_error(sid, H2ErrorCode.REFUSED_STREAM, events)
                return
            if bad_priority:
                self._stream_error(sid, H2ErrorCode.PROTOCOL_ERROR, events)
                return
            st = self.streams[sid] = _Stream(self.peer_initial_window, self.local_initial_window)
            st.heads = 1
            st.remote_closed = end
            events.append(RequestReceived(sid, headers, end))
            return
        if st.remote_closed:
            self._stream_error(sid, H2ErrorCode.STREAM_CLOSED, events)
            return
        if bad_priority:
            self._stream_error(sid, H2ErrorCode.PROTOCOL_ERROR, events)
            return
        if st.heads == 0:  # client side: the response head
            status = headers[0][1] if headers and headers[0][0] == b":status" else b""
            if not status or (status[:1] == b"1" and end):
                self._stream_error(sid, H2ErrorCode.PROTOCOL_ERROR, events)
                return
            if status[:1] == b"1":
                events.append(InformationalResponseReceived(sid, headers))
                return
            st.heads = 1
            if end:
                st.remote_closed = True
                if st.local_closed:
                    self._ended(sid)
            events.append(ResponseReceived(sid, headers, end))
            return
        if not end:  # a second block is trailers, and trailers end the stream
            self._stream_error(sid, H2ErrorCode.PROTOCOL_ERROR, events)
            return
        st.heads = 2
        st.remote_closed = True
        if st.local_closed:
            self._ended(sid)
        events.append(TrailersReceived(sid, headers))

    def _priority(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if sid == 0:
            raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self._stream_error(sid, H2ErrorCode.FRAME_SIZE_ERROR, events)
        elif parse_priority(payload)[0] == sid:
            self._stream_error(sid, H2ErrorCode.PROTOCOL_ERROR, events)

    def _rst_stream(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if sid == 0:
            raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise H2ConnectionError(H2ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes")
        if self.streams.pop(sid, None) is None:
            if self._idle(sid):
                raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            return
        self._remember(sid, _RESET_THERE)
        if sid & 1 == self._peer_parity:
            self._spend_credit()
        events.append(StreamReset(sid, parse_u32(payload), True))

    def _settings(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if sid != 0:
            raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2ConnectionError(H2ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise H2ConnectionError(H2ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        changes = {}
        for key, value in parse_settings(payload):
            if key == H2Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2ConnectionError(H2ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for st in self.streams.values():
                    st.send_window += delta
                    if st.send_window > MAX_WINDOW:
                        raise H2ConnectionError(H2ErrorCode.FLOW_CONTROL_ERROR, "a stream window above 2^31-1")
            elif key == H2Setting.MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= MAX_MAX_FRAME:
                    raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value} out of range")
                self.peer_max_frame = value
                self.send_frame_max = min(value, SEND_FRAME_MAX)
            elif key == H2Setting.MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif key == H2Setting.ENABLE_PUSH:
                if value > 1 or (value == 1 and self.client_side):
                    raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
            elif key == H2Setting.HEADER_TABLE_SIZE:
                self.peer_header_table_size = value  # the static encoder's table is 0 bytes anyway
            elif key == H2Setting.MAX_HEADER_LIST_SIZE:
                self.peer_max_header_list_size = value
            else:
                continue
            changes[key] = value
        self._out.append(frame(SETTINGS, ACK, 0))
        events.append(RemoteSettingsChanged(changes))

    def _push_promise(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE (push is disabled)")

    def _ping(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if sid != 0:
            raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise H2ConnectionError(H2ErrorCode.FRAME_SIZE_ERROR, "PING not 8 bytes")
        if flags & ACK:
            events.append(PingAcknowledged(payload))
        else:
            self._out.append(frame(PING, ACK, 0, payload))

    def _goaway(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if sid != 0:
            raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise H2ConnectionError(H2ErrorCode.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        last, code, debug = parse_goaway(payload)
        if self.goaway_received is not None and self.goaway_received < last:
            last = self.goaway_received  # a later GOAWAY may only lower it
        self.goaway_received = last
        events.append(GoawayReceived(last, code, debug))
        mine = 1 - self._peer_parity
        for s in [s for s in self.streams if s > last and s & 1 == mine]:
            del self.streams[s]
            self._remember(s, _RESET_HERE)
            events.append(StreamReset(s, H2ErrorCode.REFUSED_STREAM, True))

    def _window_update(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if len(payload) != 4:
            raise H2ConnectionError(H2ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")
        inc = int.from_bytes(payload, "big") & _MASK
        if sid == 0:
            if inc == 0:
                raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += inc
            if self._send_window > MAX_WINDOW:
                raise H2ConnectionError(H2ErrorCode.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            events.append(WindowUpdated(0, inc))
            return
        st = self.streams.get(sid)
        if st is None:
            if self._idle(sid):
                raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return  # a stream just closed: allowed, and nothing to do
        if inc == 0:
            self._stream_error(sid, H2ErrorCode.PROTOCOL_ERROR, events)
            return
        st.send_window += inc
        if st.send_window > MAX_WINDOW:
            self._stream_error(sid, H2ErrorCode.FLOW_CONTROL_ERROR, events)
            return
        events.append(WindowUpdated(sid, inc))

    # ------------------------------------------------------------------ stream bookkeeping

    def _idle(self, sid: int) -> bool:
        if sid & 1 == self._peer_parity:
            return sid > self._last_peer_sid
        return sid >= self.next_stream_id

    def _not_open(self, sid: int, what: str, events: list[Any]) -> None:
        """DATA or HEADERS for a stream that is not open for receiving (see the top)."""
        if sid in self.streams:  # half-closed (remote)
            self._stream_error(sid, H2ErrorCode.STREAM_CLOSED, events)
            return
        how = self._closed.get(sid)
        if how is None:
            how = self._closed_before.get(sid)
        if how == _RESET_HERE:
            return
        if how == _ENDED:
            raise H2ConnectionError(H2ErrorCode.STREAM_CLOSED, f"{what} on stream {sid} after END_STREAM")
        if how is None and self._idle(sid):
            raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, f"{what} on idle stream {sid}")
        self._stream_error(sid, H2ErrorCode.STREAM_CLOSED, events)

    def _stream_error(self, sid: int, code: int, events: list[Any]) -> None:
        """RFC 9113 5.4.2: RST_STREAM; the caller hears of it if the stream was open."""
        self._out.append(rst_stream_frame(sid, code))
        if self.streams.pop(sid, None) is not None:
            events.append(StreamReset(sid, code, False))
        self._remember(sid, _RESET_HERE)
        if sid & 1 == self._peer_parity:
            self._spend_credit()

    def _spend_credit(self) -> None:
        self._credit -= 1
        if self._credit < 0:
            raise H2ConnectionError(H2ErrorCode.ENHANCE_YOUR_CALM,
                                    "too many streams reset or refused (rapid reset)")

    def _end_local(self, sid: int, st: _Stream) -> None:
        st.local_closed = True
        if st.remote_closed:
            self._ended(sid)

    def _ended(self, sid: int) -> None:
        del self.streams[sid]
        self._remember(sid, _ENDED)
        if sid & 1 == self._peer_parity and self._credit < self._credit_max:
            self._credit += 1

    def _remember(self, sid: int, how: int) -> None:
        """Two generations rather than evicting the oldest entry one by one: deleting a
        dict's first entry again and again makes finding the next first entry ever slower
        (CPython skips the deleted slots), and here it would happen once per stream."""
        closed = self._closed
        closed[sid] = how
        if len(closed) >= CLOSED_REMEMBERED // 2:
            self._closed_before = closed
            self._closed = {}

    def _give_back(self, n: int) -> None:
        u = self._conn_unacked + n
        if u >= self._conn_target >> 1:
            self._recv_window += u
            self._out.append(window_update_frame(0, u))
            u = 0
        self._conn_unacked = u


def _unpad(payload: bytes) -> bytes:
    if not payload:
        raise H2ConnectionError(H2ErrorCode.FRAME_SIZE_ERROR, "PADDED frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise H2ConnectionError(H2ErrorCode.PROTOCOL_ERROR, "padding as long as the frame")
    return payload[1:len(payload) - pad]


_HANDLERS = [None, None, H2Connection._priority, H2Connection._rst_stream, H2Connection._settings,
             H2Connection._push_promise, H2Connection._ping, H2Connection._goaway,
             H2Connection._window_update, H2Connection._continuation]
