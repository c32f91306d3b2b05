"""Is a client's HTTP/2 header block well-formed (RFC 9113 8.2, 8.3)? h2's own inbound
checks, in one pass.

h2 validates with a chain of generators that walk every byte of every header in Python:
8% of the proxy's time per gRPC call. The same rules here cost one set lookup for a
header already seen well-formed (a client sends the same headers call after call) and
two regular-expression searches otherwise. A malformed request is the client's error: its
stream is reset (PROTOCOL_ERROR) and never reaches an endpoint, where it would be counted
as the endpoint's failure.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Field names: no controls, space, uppercase, DEL or non-ASCII; no colon but a leading one.
_BAD_NAME = re.compile(rb"[^\x21-\x39\x3b-\x40\x5b-\x7e]")
#: Field values: no NUL, LF or CR; no leading or trailing space or tab.
_BAD_VALUE = re.compile(rb"[\x00\n\r]|^[ \t]|[ \t]$")
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                  b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
#: Fields seen well-formed, kept while few (a bound, not a cache policy).
_seen: set[tuple[bytes, bytes]] = set()
_SEEN_MAX = 4096


def _bad_field(name: bytes, value: bytes) -> str | None:
    if (name, value) in _seen:
        return None
    if not name:
        return "empty header name"
    if _BAD_NAME.search(name, 1 if name[0] == 0x3A else 0):
        return f"illegal character in header name {name!r}"
    if value and _BAD_VALUE.search(value):
        return f"illegal character or surrounding whitespace in the value of {name!r}"
    if name in _CONNECTION_SPECIFIC:
        return f"connection-specific header {name!r}"
    if name == b"te" and value.lower() != b"trailers":
        return f"TE header other than trailers: {value!r}"
    if len(_seen) >= _SEEN_MAX:
        _seen.clear()
    _seen.add((name, value))
    return None


def malformed_request(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """Why a request's header block is malformed, or None."""
    pseudo: dict[bytes, bytes] = {}
    regular = False
    host = None
    for name, value in headers:
        why = _bad_field(name, value)
        if why is not None:
            return why
        if name[0] == 0x3A:
            if regular:
                return f"pseudo-header {name!r} after a regular header"
            if name not in _REQUEST_PSEUDO:
                return f"unknown pseudo-header {name!r}"
            if name in pseudo:
                return f"duplicate pseudo-header {name!r}"
            pseudo[name] = value
        else:
            regular = True
            if name == b"host":
                if host is not None:
                    return "more than one Host header"
                host = value
    method = pseudo.get(b":method")
    if method is None:
        return "no :method"
    if method == b"CONNECT" and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            return "CONNECT with :scheme or :path"
    else:
        if b":protocol" in pseudo and method != b"CONNECT":
            return ":protocol outside CONNECT"
        if b":scheme" not in pseudo or b":path" not in pseudo:
            return "no :scheme or :path"
        if not pseudo[b":path"]:
            return "empty :path"
    authority = pseudo.get(b":authority")
    if authority is None and host is None:
        return "neither :authority nor Host"
    if authority is not None and host is not None and authority != host:
        return ":authority and Host differ"
    return None


def malformed_trailers(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a trailer block is malformed, or None."""
    for name, value in headers:
        why = _bad_field(name, value)
        if why is not None:
            return why
        if name[0] == 0x3A:
            return f"pseudo-header {name!r} in trailers"
    return None
