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
"""

from __future__ import annotations

import re

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
                 "upgrade", "raw")

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


def simple_request(data: bytes) -> tuple[Head, int] | None:
    """A body-less request whose whole head starts `data`: (head, bytes used), or None
    when llhttp must parse it."""
    m = _REQUEST.match(data)
    if m is None:
        return None
    h = Head()
    if not _fields(h, m.group(3), _REQUEST_FALLBACK, _REQUEST_REWRITTEN):
        return None
    h.method = m.group(1)
    h.target = m.group(2)
    return h, m.end()


def simple_response(data: bytes) -> tuple[Head, bytes] | None:
    """An answer that is exactly `data`: a head with one content-length and that many
    body bytes after it; (head, body), or None when llhttp must parse it."""
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
    if length is None or len(data) != m.end() + length:
        return None
    h.status = status
    h.reason = m.group(2)
    h.length = length
    return h, data[m.end():]
