"""What an `H2Connection` reports (events) and the errors it raises, named by who is at
fault: the peer (`H2ConnectionError`, the connection is over and a GOAWAY saying why is
queued) or the caller (`H2UsageError` and its kinds; nothing was sent).

Events are small slotted classes, not frozen dataclasses: one is made per frame on the
proxy's hot path, and a frozen dataclass's __init__ costs several times a plain one.
"""

from __future__ import annotations

from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class RequestReceived:
    """A peer-initiated stream opened (server side)."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(slots=True)
class ResponseReceived:
    """The final (non-1xx) response head on a stream this side opened (client side)."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(slots=True)
class InformationalResponseReceived:
    """A 1xx response head; the final one is still to come."""

    stream_id: int
    headers: Headers


@dataclass(slots=True)
class TrailersReceived:
    """A header block after the head: it ends the stream."""

    stream_id: int
    headers: Headers


@dataclass(slots=True)
class DataReceived:
    """`flow_controlled_length` (data plus padding) is what `H2Connection.ack_data` must
    be told once the data is consumed, or the peer's windows never reopen."""

    stream_id: int
    data: bytes
    flow_controlled_length: int
    end_stream: bool


@dataclass(slots=True)
class StreamReset:
    """The stream is over: reset by the peer (`remote`), or by this side for the peer's
    stream error, or refused by a GOAWAY (streams above its last stream id)."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(slots=True)
class WindowUpdated:
    """A send window grew (stream 0: the connection's); blocked data may go on."""

    stream_id: int
    delta: int


@dataclass(slots=True)
class RemoteSettingsChanged:
    """The peer's SETTINGS, applied (and acknowledged)."""

    changes: dict[int, int]


@dataclass(slots=True)
class GoawayReceived:
    """No new streams on this connection; streams up to `last_stream_id` may finish."""

    last_stream_id: int
    error_code: int
    debug: bytes


@dataclass(slots=True)
class PingAcknowledged:
    data: bytes


class H2ConnectionError(Exception):
    """The peer broke the protocol; the connection is over (RFC 9113 5.4.1). A GOAWAY with
    `code` is queued in the connection's output."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class H2UsageError(Exception):
    """The caller asked for something the protocol forbids now; nothing was queued."""


class H2StreamClosedError(H2UsageError):
    """The stream is not open for sending (ended, reset, or never opened)."""


class H2FlowControlBlocked(H2UsageError):
    """More data than the peer's windows allow (see `H2Connection.send_window`)."""


class H2StreamRefused(H2UsageError):
    """No new stream can be opened: the peer's MAX_CONCURRENT_STREAMS, or a GOAWAY."""
