"""The http2 proxy's own check of client header blocks (h2's inbound validation, cheaper)."""

from __future__ import annotations

import pytest

from softlb_agent.proxy.h2headers import malformed_request, malformed_trailers

GOOD = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/demo.Echo/Call"), (b":authority", b"x"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"100m")]


def with_(*extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return GOOD + list(extra)


def without(name: bytes) -> list[tuple[bytes, bytes]]:
    return [h for h in GOOD if h[0] != name]


@pytest.mark.parametrize("headers", [
    GOOD,
    with_((b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"x-empty", b"")),
    with_((b"host", b"x")),  # Host equal to :authority
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"x")],  # Host alone
    [(b":method", b"CONNECT"), (b":authority", b"x:443")],
    [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"), (b":path", b"/ws"),
     (b":authority", b"x")],
])
def test_well_formed_requests_pass(headers):
    assert malformed_request(headers) is None
    assert malformed_request(headers) is None  # and again, from what was seen


@pytest.mark.parametrize("headers, why", [
    (with_((b"X-Upper", b"v")), "illegal character in header name"),
    (with_((b"bad name", b"v")), "illegal character in header name"),
    (with_((b"na:me", b"v")), "illegal character in header name"),
    (with_((b"x-caf\xc3\xa9", b"v")), "illegal character in header name"),
    (with_((b"", b"v")), "empty header name"),
    (with_((b"x-a", b"a\r\nb: c")), "illegal character"),
    (with_((b"x-a", b"a\x00b")), "illegal character"),
    (with_((b"x-a", b" padded")), "surrounding whitespace"),
    (with_((b"x-a", b"padded\t")), "surrounding whitespace"),
    (with_((b"connection", b"close")), "connection-specific"),
    (with_((b"transfer-encoding", b"chunked")), "connection-specific"),
    (with_((b"upgrade", b"h2c")), "connection-specific"),
    ([h if h[0] != b"te" else (b"te", b"gzip") for h in GOOD], "TE header"),
    (with_((b":method", b"GET")), "after a regular header"),
    ([(b":method", b"GET"), (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"x")],
     "duplicate pseudo-header"),
    ([(b":status", b"200")] + GOOD, "unknown pseudo-header"),
    ([(b":bogus", b"1")] + GOOD, "unknown pseudo-header"),
    (without(b":method"), "no :method"),
    (without(b":path"), "no :scheme or :path"),
    (without(b":scheme"), "no :scheme or :path"),
    ([(b":path", b"") if h[0] == b":path" else h for h in GOOD], "empty :path"),
    (without(b":authority"), "neither :authority nor Host"),
    (with_((b"host", b"y")), ":authority and Host differ"),
    (with_((b"host", b"x"), (b"host", b"x")), "more than one Host"),
    ([(b":method", b"CONNECT"), (b":authority", b"x"), (b":path", b"/")], "CONNECT with :scheme or :path"),
    ([(b":method", b"GET"), (b":protocol", b"websocket"), (b":scheme", b"http"), (b":path", b"/"),
      (b":authority", b"x")], ":protocol outside CONNECT"),
])
def test_malformed_requests_say_why(headers, why):
    got = malformed_request(headers)
    assert got is not None and why in got, got


def test_a_field_seen_well_formed_does_not_excuse_another():
    assert malformed_request(with_((b"x-a", b"ok"))) is None
    assert malformed_request(with_((b"x-a", b"ok "))) is not None
    assert malformed_request(with_((b"X-A", b"ok"))) is not None


def test_trailers():
    assert malformed_trailers([(b"grpc-status", b"0"), (b"x-t", b"v")]) is None
    assert "pseudo-header" in malformed_trailers([(b":status", b"200")])  # type: ignore[operator]
    assert "illegal" in malformed_trailers([(b"Grpc-Status", b"0")])  # type: ignore[operator]
