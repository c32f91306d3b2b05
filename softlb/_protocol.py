"""Wire protocol v1 messages: validating requests, encoding responses (docs/PROTOCOL.md).

Request:   {"id": int|str, "op": str, ...op arguments}
Success:   {"id": <echo>, "result": <op result>}
Failure:   {"id": <echo or nil>, "error": {"code": <ErrorCode>, "message": str}}

The resolve answer is the hot path: every endpoint's constant fields are packed once when the
endpoint set changes (`pack_endpoint_fields`) and spliced into each answer, so a resolve costs
one small pack for the id and the per-request fields rather than a whole map.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import msgpack

from ._errors import ErrorCode, RemoteProtocolError, RequestError
from ._types import Endpoint
from ._wire import encode_frame

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
