"""Wire protocol v1 as a sans-I/O protocol object, in h11's shape (docs/PROTOCOL.md).

    conn = ServerConnection(max_frame)
    conn.receive_data(bytes_from_socket)        # b"" means the peer closed
    while (event := conn.next_event()) is not NEED_DATA:
        ...                                     # a typed request, Rejected, or CLOSED
    sock.send(conn.send_pick(rid, pick))        # or send_result / send_error

`next_event` does the framing and the validation of every request: what comes out is a
typed request (`Resolve`, `Report`, ...) whose arguments are checked, or `Rejected` (answer
it with `send_error`; when `fatal`, framing is lost and the connection must close after that
answer), or `CLOSED` at EOF. Front ends that do not speak frames (the admin HTTP API) build
the same typed requests from their own input with `parse_request`, so every front end gets
the same checks and the same messages.

Request:   {"id": int|str, "op": str, ...op arguments}
Success:   {"id": <echo>, "result": <op result>}
Failure:   {"id": <echo or nil>, "error": {"code": <ErrorCode>, "message": str}}

The resolve answer is the hot path: every endpoint's constant fields are packed once when the
endpoint set changes (`pack_endpoint_fields`) and spliced into each answer, so a resolve costs
one small pack for the id and the per-request fields rather than a whole map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Mapping, NamedTuple, Sequence

import msgpack

from ._errors import ErrorCode, RemoteProtocolError, RequestError
from ._types import Endpoint
from ._wire import NEED_DATA, FrameDecoder, _NeedData, decode_body, encode_frame

#: Longest service name / key / tag accepted; generous, but bounds what a client can make us hash.
MAX_NAME = 512
MAX_TAGS = 32

_pack = msgpack.Packer(use_bin_type=True).pack
_K_ID = _pack("id")
_K_RESULT = _pack("result")
_K_LEASE = _pack("lease")
_K_PANIC = _pack("panic")
_K_STALE = _pack("stale")
_K_AGE = _pack("age")
_TRUE, _FALSE, _NIL = _pack(True), _pack(False), _pack(None)

#: The endpoint fields every resolve answer carries, in wire order.
ENDPOINT_FIELDS = ("address", "port", "id", "tags", "meta", "weight", "node", "zone", "region")


def request_id(msg: Any) -> Any:
    """The id to echo: a valid one, else nil (so the client still gets an answer)."""
    if isinstance(msg, dict):
        rid = msg.get("id")
        if isinstance(rid, (int, str)) and not isinstance(rid, bool):
            return rid
    return None


def check_request(msg: Any) -> tuple[Any, str]:
    """(id, op) of a request map, or RemoteProtocolError(BAD_FRAME / BAD_ARGUMENT)."""
    if not isinstance(msg, dict):
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"a request must be a map, got {type(msg).__name__}")
    rid = msg.get("id")
    if rid is None or isinstance(rid, bool) or not isinstance(rid, (int, str)):
        raise RemoteProtocolError(ErrorCode.BAD_ARGUMENT, "request needs an \"id\" (integer or string)")
    op = msg.get("op")
    if not isinstance(op, str):
        raise RemoteProtocolError(ErrorCode.BAD_ARGUMENT, "request needs an \"op\" (string)", request_id=rid)
    return rid, op


def arg_service(msg: Mapping[str, Any]) -> str:
    s = msg.get("service")
    if not isinstance(s, str) or not s or len(s) > MAX_NAME:
        raise RequestError(ErrorCode.BAD_ARGUMENT, "\"service\" must be a non-empty string")
    return s


def arg_key(msg: Mapping[str, Any]) -> str | None:
    k = msg.get("key")
    if k is None:
        return None
    if isinstance(k, bytes):
        k = k.decode("latin-1")  # any bytes map 1:1, so hashing stays stable
    if not isinstance(k, str) or len(k) > MAX_NAME:
        raise RequestError(ErrorCode.BAD_ARGUMENT, "\"key\" must be a string or bytes")
    return k


def arg_tags(msg: Mapping[str, Any]) -> tuple[str, ...]:
    t = msg.get("tags")
    if t is None:
        return ()
    if (
        not isinstance(t, list)
        or len(t) > MAX_TAGS
        or not all(isinstance(x, str) and len(x) <= MAX_NAME for x in t)
    ):
        raise RequestError(ErrorCode.BAD_ARGUMENT, f"\"tags\" must be a list of at most {MAX_TAGS} strings")
    return tuple(sorted(set(t)))


def arg_bool(msg: Mapping[str, Any], name: str, default: bool) -> bool:
    v = msg.get(name, default)
    if not isinstance(v, bool):
        raise RequestError(ErrorCode.BAD_ARGUMENT, f"\"{name}\" must be true or false")
    return v


def arg_number(msg: Mapping[str, Any], name: str) -> float | None:
    v = msg.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        # NaN fails both comparisons; inf would poison latency averages forever.
        raise RequestError(ErrorCode.BAD_ARGUMENT, f"\"{name}\" must be a finite non-negative number")
    return float(v)


def arg_versions(msg: Mapping[str, Any]) -> Sequence[int]:
    v = msg.get("versions", [1])
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise RequestError(ErrorCode.BAD_ARGUMENT, "\"versions\" must be a non-empty list of integers")
    return v


# ---------------------------------------------------------------------------- responses


def ok_frame(rid: Any, result: Any) -> bytes:
    return encode_frame({"id": rid, "result": result})


def error_frame(rid: Any, code: ErrorCode, message: str) -> bytes:
    return encode_frame({"id": rid, "error": {"code": code.value, "message": message}})


def pack_endpoint_fields(ep: Endpoint) -> bytes:
    """The endpoint's constant key/value pairs, packed back to back without a map header."""
    return b"".join(
        (
            _pack("address"), _pack(ep.address),
            _pack("port"), _pack(ep.port),
            _pack("id"), _pack(ep.id),
            _pack("tags"), _pack(list(ep.tags)),
            _pack("meta"), _pack(dict(ep.meta)),
            _pack("weight"), _pack(ep.weight),
            _pack("node"), _pack(ep.node),
            _pack("zone"), _pack(ep.zone),
            _pack("region"), _pack(ep.region),
        )
    )


def resolve_frame(rid: Any, packed_endpoint: bytes, lease: int | None, panic: bool, stale: bool, age: float | None) -> bytes:
    """`{"id": rid, "result": {<endpoint fields>, lease, panic, stale[, age]}}` as one frame."""
    n = len(ENDPOINT_FIELDS) + 3
    tail = [_K_LEASE, _NIL if lease is None else _pack(lease), _K_PANIC, _TRUE if panic else _FALSE,
            _K_STALE, _TRUE if stale else _FALSE]
    if age is not None:
        n += 1
        tail += (_K_AGE, _pack(round(age, 3)))
    body = b"".join((b"\x82", _K_ID, _pack(rid), _K_RESULT, bytes((0x80 | n,)), packed_endpoint, *tail))
    return len(body).to_bytes(4, "big") + body


# ---------------------------------------------------------------------------- typed requests
# Typed requests are NamedTuples: immutable like frozen dataclasses, but built in a fraction
# of the time (a frozen dataclass sets each field through object.__setattr__), and one is
# built per request on the hot path. Front ends tell them apart by `type(ev) is Resolve`.

#: Every op of protocol v1 (the `hello` answer lists them).
OPS: Final = ("hello", "resolve", "report", "services", "endpoints", "watch", "unwatch")


class Hello(NamedTuple):
    id: Any
    versions: Sequence[int]


class Resolve(NamedTuple):
    id: Any
    service: str
    key: str | None
    tags: tuple[str, ...]
    lease: bool


class Report(NamedTuple):
    id: Any
    ok: bool
    latency: float | None
    lease: int | None
    service: str | None
    endpoint: str | None


class Services(NamedTuple):
    id: Any


class Endpoints(NamedTuple):
    id: Any
    service: str


class Watch(NamedTuple):
    id: Any
    service: str


class Unwatch(NamedTuple):
    id: Any
    watch: Any  # the id of the watch request to end (any value: an unknown one is refused later)


Request = Hello | Resolve | Report | Services | Endpoints | Watch | Unwatch


@dataclass(frozen=True, slots=True)
class Rejected:
    """A frame or request the peer got wrong: answer `send_error(id, code, message)`. When
    `fatal`, framing is lost: close the connection after that answer."""

    id: Any
    code: ErrorCode
    message: str
    fatal: bool = False


class _Closed:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CLOSED"


CLOSED: Final = _Closed()


def _arg_lease(msg: Mapping[str, Any]) -> int | None:
    v = msg.get("lease")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(ErrorCode.BAD_ARGUMENT, "\"lease\" must be an integer")
    return v


def _optional_str(msg: Mapping[str, Any], name: str) -> str | None:
    v = msg.get(name)
    return v if isinstance(v, str) else None


def _parse_args(rid: Any, op: str, msg: Mapping[str, Any]) -> Request:
    if op == "resolve":
        return Resolve(rid, arg_service(msg), arg_key(msg), arg_tags(msg), arg_bool(msg, "lease", True))
    if op == "report":
        return Report(rid, arg_bool(msg, "ok", True), arg_number(msg, "latency"), _arg_lease(msg),
                      _optional_str(msg, "service"), _optional_str(msg, "endpoint"))
    if op == "services":
        return Services(rid)
    if op == "endpoints":
        return Endpoints(rid, arg_service(msg))
    if op == "hello":
        return Hello(rid, arg_versions(msg))
    if op == "watch":
        return Watch(rid, arg_service(msg))
    if op == "unwatch":
        return Unwatch(rid, msg.get("watch"))
    raise RequestError(ErrorCode.UNKNOWN_OP, f"unknown op \"{op[:64]}\" (known: {', '.join(OPS)})")


def parse_request(msg: Any) -> Request | Rejected:
    """A decoded message as a typed request with checked arguments, or why not."""
    try:
        rid, op = check_request(msg)
    except RemoteProtocolError as e:
        return Rejected(e.request_id if e.request_id is not None else request_id(msg), e.code, e.message)
    try:
        return _parse_args(rid, op, msg)
    except RequestError as e:
        return Rejected(rid, e.code, e.message)


class ServerConnection:
    """The agent's side of one protocol connection: bytes in, typed events out; answers in,
    bytes out. Holds no socket and never blocks."""

    __slots__ = ("_decoder", "_eof")

    def __init__(self, max_frame: int) -> None:
        self._decoder = FrameDecoder(max_frame)
        #: False while open; True once the peer closed; None once framing is lost.
        self._eof: bool | None = False

    def receive_data(self, data: bytes) -> None:
        if self._eof is None:
            return
        if data:
            self._decoder.feed(data)
        else:
            self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed as events (a partial frame, or frames the
        front end has not asked for yet)."""
        return self._decoder.buffered

    def next_event(self) -> Request | Rejected | _NeedData | _Closed:
        if self._eof is None:
            return CLOSED  # framing was lost: nothing after it can be read
        try:
            body = self._decoder.next_body()
        except RemoteProtocolError as e:  # a length over max_frame: framing is lost
            self._eof = None
            return Rejected(None, e.code, e.message, fatal=True)
        if body is NEED_DATA:
            return CLOSED if self._eof else NEED_DATA
        try:
            msg = decode_body(body)  # type: ignore[arg-type]
        except RemoteProtocolError as e:
            return Rejected(None, e.code, e.message)
        return parse_request(msg)

    # Answers: each returns one whole frame to send.

    @staticmethod
    def send_result(rid: Any, result: Any) -> bytes:
        return ok_frame(rid, result)

    @staticmethod
    def send_error(rid: Any, code: ErrorCode, message: str) -> bytes:
        return error_frame(rid, code, message)

    @staticmethod
    def send_pick(rid: Any, pick: Any) -> bytes:
        """A resolve answer from an engine `Pick` (its pre-packed endpoint fields spliced in)."""
        return resolve_frame(rid, pick.wire, pick.lease, pick.panic, pick.stale, pick.age)
