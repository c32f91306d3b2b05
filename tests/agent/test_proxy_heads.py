"""The http proxy's fast path for plain heads (agent/proxy/heads.py) against llhttp.

Whatever the fast path takes, llhttp must read the same way; whatever llhttp refuses, the
fast path must leave to it. Checked on generated heads full of hostile shapes (smuggling,
obs-fold, bare LF, stray bytes), then through a real agent for the shapes that matter.
"""

from __future__ import annotations

import socket

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy import heads
from agent.proxy.heads import simple_request, simple_response
from agent.proxy.http1 import Parser, _headers_for

from agentproc import endpoint_toml, free_port
from proxyhelp import HttpBackend, recv_line
from test_proxy_tcp import proxy_config


def llhttp(data: bytes, response: bool) -> tuple[list[tuple], bool] | None:
    """llhttp's reading of `data` alone (the fast path bypassed): (events, in_message),
    or None when it refuses it."""
    p = Parser(response=response)
    try:
        p.p.feed_data(data)
    except httptools.HttpParserError:
        return None
    return list(p.events), p.in_message


def fields(h) -> tuple:
    return (h.method, h.target, h.status, h.reason, h.headers, h.keep_alive, h.chunked, h.length, h.version,
            h.upgrade)


def raw_passes_as_rebuilt(h) -> bool:
    """A head passed on as its bytes came says what the rebuilt one would (header names
    compare without case)."""
    if h.raw is None:
        return True
    lines = [line.partition(b":") for line in h.raw.split(b"\r\n")[:-1]]
    return [(n.lower(), v.lstrip(b" \t")) for n, _, v in lines] == _headers_for(h.headers, None) and \
        all(n.lower() != b"x-forwarded-for" for n, _, _ in lines)


# Heads are built well-formed, then 0-2 hostile edits land anywhere in them: most
# examples are plain (the fast path's case), the rest are near misses.
_value_chars = st.sampled_from([b"a", b"Z", b"0", b"-", b"/", b"?", b"=", b"%", b"#", b'"', b"{", b"|", b"\\", b"~",
                                b" ", b"\t", b",", b";", b":", b"chunked", b"close", b"keep-alive", b"gzip"])
_value = st.lists(_value_chars, max_size=6).map(b"".join)
_name = st.sampled_from([b"Host", b"x-a", b"User-Agent", b"Accept", b"X-Forwarded-For", b"content-type", b"Te",
                         b"Trailer", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade", b"Expect",
                         b"Keep-Alive", b"!#$%&'*+-.^_`|~"])
_header = st.tuples(_name, st.sampled_from([b":", b": ", b":  ", b": \t"]), _value).map(
    lambda t: t[0] + t[1] + t[2] + b"\r\n")
_edit = st.tuples(st.integers(0, 10**6), st.sampled_from([b"\r", b"\n", b" ", b"\t", b"\x7f", b"\x80", b"\xff",
                                                           b"\x00", b"\x01", b":", b"\r\n", b" folded\r\n", b"",
                                                           b"Content-Length: 3\r\n",
                                                           b"Transfer-Encoding: chunked\r\n"]),
                  st.integers(0, 2))


def _edited(data: bytes, edits: list[tuple[int, bytes, int]]) -> bytes:
    for at, insert, cut in edits:
        at %= len(data) + 1
        data = data[:at] + insert + data[at + cut:]
    return data


@st.composite
def requests(draw) -> bytes:
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT",
                                   b"get"]))
    target = draw(st.sampled_from([b"/", b"/x", b"/a?b=c", b"*", b"http://a/"])) + draw(_value).replace(b" ", b"")
    head = method + b" " + target + b" HTTP/1.1\r\n" + b"".join(draw(st.lists(_header, max_size=4))) + b"\r\n"
    tail = draw(st.sampled_from([b"", b"abc", b"0\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"]))
    return _edited(head, draw(st.lists(_edit, max_size=2))) + tail


@st.composite
def responses(draw) -> bytes:
    status = draw(st.sampled_from([b"200", b"200", b"404", b"503", b"204", b"304", b"100", b"101"]))
    body = draw(st.sampled_from([b"", b"abc", b"hello from b1"]))
    length = draw(st.sampled_from([b"%d" % len(body)] * 4 + [b"0", b"3", b"0%d" % len(body), b" %d" % len(body)]))
    head = (b"HTTP/1.1 " + status + b" " + draw(_value) + b"\r\n" + b"".join(draw(st.lists(_header, max_size=3)))
            + draw(st.sampled_from([b"Content-Length: ", b"content-length:", b""])) + length + b"\r\n\r\n")
    return _edited(head, draw(st.lists(_edit, max_size=2))) + body


@settings(max_examples=3000, deadline=None)
@given(requests())
def test_simple_request_reads_as_llhttp_does(data: bytes) -> None:
    got = simple_request(data)
    if got is None:
        return
    head, used = got
    ref = llhttp(data[:used], response=False)
    assert ref is not None, data  # never accept what llhttp refuses
    events, in_message = ref
    assert not in_message and [e[0] for e in events] == ["head", "end"], data
    assert fields(head) == fields(events[0][1]), data
    assert raw_passes_as_rebuilt(head), data


@settings(max_examples=3000, deadline=None)
@given(responses())
def test_simple_response_reads_as_llhttp_does(data: bytes) -> None:
    got = simple_response(data)
    if got is None:
        return
    head, body = got
    ref = llhttp(data, response=True)
    assert ref is not None, data
    events, in_message = ref
    assert not in_message and events[0][0] == "head" and events[-1] == ("end",), data
    assert fields(head) == fields(events[0][1]), data
    assert raw_passes_as_rebuilt(head) or b"x-forwarded-for" in head.raw.lower(), data
    assert body == b"".join(e[1] for e in events if e[0] == "data"), data


#: Shapes a smuggler uses: llhttp refuses each; the fast path must not take any.
HOSTILE = [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: x\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: x\r\n\tfolded\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\n",
    b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
    b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
]


@pytest.mark.parametrize("data", HOSTILE)
def test_smuggling_shapes_left_to_llhttp_which_refuses_them(data: bytes) -> None:
    assert simple_request(data) is None
    with pytest.raises(httptools.HttpParserError):
        Parser(response=False).feed(data)


def test_plain_request_and_answer_take_the_fast_path() -> None:
    """The shapes wrk and a typical server send: the fast path must take them (else it
    saves nothing)."""
    req = simple_request(b"GET /x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: t\r\n\r\nGET /")
    assert req is not None and req[1] == len(b"GET /x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: t\r\n\r\n")
    assert req[0].headers == [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"t")]
    ans = simple_response(b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\ncontent-type: text/plain\r\n\r\nhello from b1")
    assert ans is not None and ans[1] == b"hello from b1" and ans[0].length == 13
    # Pipelined: both requests taken, then the partial third left to llhttp.
    p = Parser(response=False)
    p.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3 HT")
    assert [e[1].target for e in p.events if e[0] == "head"] == [b"/1", b"/2"]
    assert p.in_message  # llhttp holds the third; the rest of it must go there too
    p.feed(b"TP/1.1\r\nHost: a\r\n\r\n")
    assert [e[1].target for e in p.events if e[0] == "head"] == [b"/1", b"/2", b"/3"]


def test_proxy_refuses_smuggling_shapes_with_400_and_serves_on(make_agent) -> None:
    b = HttpBackend("b1")
    try:
        port = free_port()
        make_agent(endpoint_toml("web", "127.0.0.1", b.port, id="b1"), proxy_config("web", port, "http")).start()
        for data in HOSTILE:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(data)
            assert recv_line(s).startswith(b"HTTP/1.1 400"), data
            s.close()
        assert sum(b.hits.values()) == 0  # nothing reached the backend
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert recv_line(s).startswith(b"HTTP/1.1 200")
        s.close()
    finally:
        b.close()


# -- the cache of plain heads by their bytes (heads.py): what it answers must be what a
# fresh read of the whole data answers, whatever came before.

def _fresh_request(data: bytes):
    """The fast path's reading of `data` with no cache and no cut at the first empty line."""
    h = heads._request_head(data)
    return None if h is None else (fields(h), h.raw, h.lines, len(h.lines) + 2)


def _fresh_response(data: bytes):
    h = heads._response_head(data)
    if h is None or len(data) != len(h.lines) + 2 + h.length:
        return None
    return fields(h), h.raw, h.lines, data[len(h.lines) + 2:]


@settings(max_examples=1500, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=4), st.integers(0, 3))
def test_cached_request_heads_read_as_fresh_ones(datas: list[bytes], again: int) -> None:
    for data in datas + datas[:again]:  # some seen before: answered from the cache
        got = simple_request(data)
        assert (None if got is None else (fields(got[0]), got[0].raw, got[0].lines, got[1])) == \
            _fresh_request(data), data


@settings(max_examples=1500, deadline=None)
@given(st.lists(responses(), min_size=1, max_size=4), st.integers(0, 3))
def test_cached_response_heads_read_as_fresh_ones(datas: list[bytes], again: int) -> None:
    for data in datas + datas[:again]:
        got = simple_response(data)
        assert (None if got is None else (fields(got[0]), got[0].raw, got[0].lines, got[1])) == \
            _fresh_response(data), data


def test_a_cached_answer_head_still_checks_its_body_length() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n"
    assert simple_response(head + b"abc") is not None
    assert simple_response(head + b"ab") is None  # the head is cached; the length is not
    assert simple_response(head + b"abcd") is None
    assert simple_response(head + b"xyz")[1] == b"xyz"


def test_head_cache_is_bounded_and_long_heads_still_read() -> None:
    for i in range(heads.CACHE_MAX + 10):
        assert simple_request(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i) is not None
    assert len(heads._requests) <= heads.CACHE_MAX
    long = b"GET / HTTP/1.1\r\nX-Long: " + b"a" * heads.HEAD_MAX + b"\r\n\r\n"
    got = simple_request(long + b"GET /next")
    assert got is not None and got[1] == len(long)  # read, not kept
    assert long not in heads._requests
