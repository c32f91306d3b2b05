"""HTTP/1.1 message heads, and a fast path for the plainest ones.

llhttp (through httptools) parses every message the proxy cannot take in one look: its
callbacks into Python cost ~10 µs a message here, a tenth of a proxied request. Most
requests and answers are plain: a whole head in one read, HTTP/1.1, no framing or
connection headers, a request without a body, an answer whose content-length body came
with it. `simple_request` and `simple_response` take those with one regular expression
and a split, and answer None for anything else, which then goes to llhttp as before.

They must never accept what llhttp refuses, nor read anything differently: the patterns
below are a strict subset of what llhttp accepts (one space between the parts of the
first line, `HTTP/1.1` exactly, token header names, visible ASCII and tab in values, CRLF
only — so obs-fold, bare LF and stray CR fall through), and every header that changes
framing or the connection (content-length, transfer-encoding, connection, upgrade, ...)
sends the message to llhttp, which keeps refusing smuggling shapes (both content-length
and transfer-encoding, duplicate content-length) exactly as before.
tests/agent/test_proxy_heads.py checks the two against each other on generated heads.

What they make of a head depends on its bytes alone, and most heads repeat byte for byte
(a client's requests, a server's answers): the last few hundred are kept by their bytes,
so a repeated head costs a search for its end and a dict lookup (~1 µs) instead of the
match and the per-line loop (~5 µs each way). Cached heads are shared: nothing writes to
a head the fast path made.
"""

from __future__ import annotations

import re
from typing import Callable

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELDS = rb"((?:" + _TOKEN + rb":[\t\x20-\x7e]*\r\n)*)\r\n"
_REQUEST = re.compile(rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH) (/[\x21-\x7e]*) HTTP/1\.1\r\n" + _FIELDS)
_RESPONSE = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9]) ([\t\x20-\x7e]*)\r\n" + _FIELDS)

#: Headers whose presence sends a message to llhttp: they frame the body or describe the
#: connection, where the fast path would have to repeat llhttp's rules.
_REQUEST_FALLBACK = frozenset({b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect",
                               b"keep-alive", b"proxy-connection"})
_RESPONSE_FALLBACK = frozenset({b"transfer-encoding", b"connection", b"upgrade", b"keep-alive",
                                b"proxy-connection"})
#: Headers the proxy drops or rewrites on the way on (hop-by-hop ones the fallbacks above
#: do not cover; a request's X-Forwarded-For gets the client appended): a head with none
#: of them is passed on as its bytes came (`Head.raw`), with no list to rebuild it from.
_RESPONSE_REWRITTEN = frozenset({b"te", b"trailer"})
_REQUEST_REWRITTEN = _RESPONSE_REWRITTEN | {b"x-forwarded-for"}


class Head:
    """A parsed request or response head."""

    __slots__ = ("method", "target", "status", "reason", "headers", "keep_alive", "chunked", "length", "version",
                 "upgrade", "raw", "lines")

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.chunked = False
        self.length: int | None = None
        self.version = "1.1"
        self.upgrade = False  # has an Upgrade header
        #: The header lines as they came (each with its CRLF), when they may be passed on
        #: as they are: set by the fast path only.
        self.raw: bytes | None = None
        #: The first line and `raw` (the head as it came but its last CRLF), set with `raw`.
        self.lines = b""

    def get(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


def _fields(h: Head, block: bytes, fallback: frozenset[bytes], rewritten: frozenset[bytes]) -> bool:
    """`h.headers` (and `h.raw`) from a header block; False if llhttp must parse it."""
    headers = h.headers
    raw = True
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in fallback:
            return False
        if name in rewritten:
            raw = False
        headers.append((name, value.lstrip(b" \t")))  # llhttp drops leading OWS, keeps trailing
    if raw:
        h.raw = block
    return True


def _request_head(data: bytes) -> Head | None:
    m = _REQUEST.match(data)
    if m is None:
        return None
    h = Head()
    if not _fields(h, m.group(3), _REQUEST_FALLBACK, _REQUEST_REWRITTEN):
        return None
    h.method = m.group(1)
    h.target = m.group(2)
    h.lines = data[:m.end() - 2]
    return h


def _response_head(data: bytes) -> Head | None:
    """The head at the start of `data`, if plain with exactly one content-length."""
    m = _RESPONSE.match(data)
    if m is None:
        return None
    status = int(m.group(1))
    if status == 204 or status == 304:
        return None
    h = Head()
    if not _fields(h, m.group(3), _RESPONSE_FALLBACK, _RESPONSE_REWRITTEN):
        return None
    length = None
    for name, value in h.headers:
        if name == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 15:
                return None
            length = int(value)
    if length is None:
        return None
    h.status = status
    h.reason = m.group(2)
    h.length = length
    h.lines = data[:m.end() - 2]
    return h


#: Heads kept by their bytes (None: not plain), at most CACHE_MAX of at most HEAD_MAX
#: bytes each, per direction; a full cache starts over (a stream of distinct heads costs
#: what it did before the cache, no more).
CACHE_MAX = 256
HEAD_MAX = 2048
_requests: dict[bytes, Head | None] = {}
_responses: dict[bytes, Head | None] = {}
_MISS = Head()


def _head(data: bytes, cache: dict[bytes, Head | None], parse: Callable[[bytes], Head | None]) -> Head | None:
    """The plain head starting `data`, or None. A match ends at the first empty line (no
    CR or LF inside a line of the patterns), so the bytes up to it decide the answer."""
    end = data.find(b"\r\n\r\n", 0, HEAD_MAX) + 4
    if end < 4:  # incomplete, or too long to keep
        return parse(data)
    key = data[:end]
    h = cache.get(key, _MISS)
    if h is _MISS:
        h = parse(key)
        if len(cache) >= CACHE_MAX:
            cache.clear()
        cache[key] = h
    return h


def simple_request(data: bytes) -> tuple[Head, int] | None:
    """A body-less request whose whole head starts `data`: (head, bytes used), or None
    when llhttp must parse it."""
    h = _head(data, _requests, _request_head)
    return None if h is None else (h, len(h.lines) + 2)


def simple_response(data: bytes) -> tuple[Head, bytes] | None:
    """An answer that is exactly `data`: a head with one content-length and that many
    body bytes after it; (head, body), or None when llhttp must parse it."""
    h = _head(data, _responses, _response_head)
    if h is None:
        return None
    end = len(h.lines) + 2
    if len(data) != end + h.length:  # type: ignore[operator]
        return None
    return h, data[end:]
