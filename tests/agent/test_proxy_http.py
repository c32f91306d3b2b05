"""The http proxy (HTTP/1.1, a pick per request): a real agent, real backends."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time

import pytest

from agentproc import endpoint_toml, free_port, wait_until
from proxyhelp import DemoBackends, HttpBackend, http_get_many, recv_line, refusing_port
from test_proxy_tcp import proxy_config


@pytest.fixture
def backends():
    made: list[HttpBackend] = []

    def make(n: int, prefix: str = "b") -> list[HttpBackend]:
        new = [HttpBackend(f"{prefix}{len(made) + i + 1}") for i in range(n)]
        made.extend(new)
        return new

    yield make
    for b in made:
        b.close()


def catalog(bs: list[HttpBackend], service: str = "web") -> str:
    return "".join(endpoint_toml(service, "127.0.0.1", b.port, id=b.name) for b in bs)


def conn(port: int, timeout: float = 10) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def get(c: http.client.HTTPConnection, path: str, method: str = "GET", body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def endpoints(agent, service: str = "web") -> dict[str, dict]:
    return {e["id"]: e for e in json.loads(agent.cli("endpoints", service, "--json").stdout)["endpoints"]}


def test_http_300_requests_on_one_connection_reach_every_backend(make_agent):
    """The must-show: one keep-alive connection, balanced per request; the tcp listener
    beside it sends the same 300 requests to one backend."""
    b = DemoBackends(3)
    try:
        ph, pt = free_port(), free_port()
        cat = b.catalog() + b.catalog().replace("services.web.", "services.webtcp.")
        make_agent(cat, proxy_config("web", ph, "http") + proxy_config("webtcp", pt, "tcp")).start()
        via_http = http_get_many(ph, 300)
        assert set(via_http) == {f"hello from web-{i}" for i in (1, 2, 3)}
        assert min(via_http.count(x) for x in set(via_http)) >= 80  # round robin: ~100 each
        via_tcp = http_get_many(pt, 300)
        assert len(set(via_tcp)) == 1
    finally:
        b.stop()


def test_http_headers_host_xff_hop_by_hop(make_agent, backends):
    (b,) = backends(1)
    port = free_port()
    make_agent(catalog([b]), proxy_config("web", port, "http")).start()
    c = conn(port)
    status, h, body = get(c, "/echo?q=1", headers={
        "Host": "app.example:8080", "X-Forwarded-For": "10.1.1.1", "Connection": "keep-alive, X-Secret",
        "X-Secret": "hop", "Keep-Alive": "timeout=5", "X-Kept": "yes"})
    assert status == 200
    doc = json.loads(body)
    hdrs = dict(doc["headers"])
    assert hdrs["host"] == "app.example:8080"
    assert hdrs["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"
    assert hdrs["x-kept"] == "yes"
    assert "x-secret" not in hdrs and "keep-alive" not in hdrs
    assert doc["path"] == "/echo?q=1"
    assert h["x-backend"] == "b1"


def test_http_plain_heads_pass_as_they_came_with_xff(make_agent, backends):
    """Plain heads skip the header list (agent/proxy/heads.py): the request still gets
    X-Forwarded-For, and TE/Trailer are still dropped; the answer's fields come back."""
    (b,) = backends(1)
    port = free_port()
    make_agent(catalog([b]), proxy_config("web", port, "http")).start()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    for extra, gone in ((b"", None), (b"TE: trailers\r\n", "te"), (b"Trailer: x\r\n", "trailer")):
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: app.example\r\nX-Kept:  yes\r\n" + extra + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
        hdrs = dict(json.loads(body)["headers"])
        assert hdrs["host"] == "app.example" and hdrs["x-kept"] == "yes"
        assert hdrs["x-forwarded-for"] == "127.0.0.1"
        assert gone is None or gone not in hdrs
    s.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_http_bodies_stream_both_ways(make_agent, backends, chunked):
    (b,) = backends(1)
    port = free_port()
    make_agent(catalog([b]), proxy_config("web", port, "http")).start()
    blob = os.urandom(1 << 20) * 16
    c = conn(port, timeout=60)
    if chunked:
        def chunks():
            for i in range(0, len(blob), 1 << 18):
                yield blob[i:i + (1 << 18)]
        c.request("POST", "/echo", body=chunks(), encode_chunked=True)
        r = c.getresponse()
        doc = json.loads(r.read())
    else:
        _, _, body = get(c, "/echo", "POST", blob)
        doc = json.loads(body)
    assert doc["length"] == len(blob)
    assert doc["sha256"] == hashlib.sha256(blob).hexdigest()
    assert ("transfer-encoding" in dict(doc["headers"])) is chunked
    status, h, body = get(c, f"/big?n={48 << 20}")
    assert status == 200 and len(body) == 48 << 20 and h["transfer-encoding"] == "chunked"
    status, _, body = get(c, "/")  # and the connection is still good
    assert body == b"hello from b1\n"


def test_http_expect_100_continue(make_agent, backends):
    (b,) = backends(1)
    port = free_port()
    make_agent(catalog([b]), proxy_config("web", port, "http")).start()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert recv_line(s).startswith(b"HTTP/1.1 100")
    while recv_line(s) != b"\r\n":
        pass
    s.sendall(b"hello")
    s.settimeout(10)
    data = b""
    while b"sha256" not in data or not data.endswith(b"}"):
        data += s.recv(65536)
    assert b'"length": 5' in data
    s.close()


def test_http_5xx_reported_as_failures_and_passed_on(make_agent, backends):
    (b,) = backends(1)
    port = free_port()
    agent = make_agent(catalog([b]), proxy_config("web", port, "http")
                       + "[services.web.outlier]\nconsecutive_failures = 100\n").start()
    c = conn(port)
    assert get(c, "/status/503")[0] == 503
    assert get(c, "/status/404")[0] == 404
    assert get(c, "/status/500")[0] == 500
    fig = endpoints(agent)["b1"]["proxy"]
    assert fig["failures"] == 2 and fig["requests"] == 3


def test_http_5xx_ejection_is_dispatched(make_agent, backends):
    """The proxy ends a request's lease without dispatching when nothing changed (nearly
    always); when its 5xx verdict ejects the endpoint, the change is still dispatched:
    the agent logs it, and the next requests go to the other backend."""
    b1, b2 = backends(2)
    port = free_port()
    agent = make_agent(catalog([b1, b2]), proxy_config("web", port, "http")
                       + "[services.web.outlier]\nconsecutive_failures = 2\n").start()
    c = conn(port)
    # /status/503 answers 503 on both; two in a row on one endpoint eject it.
    for _ in range(4):
        get(c, "/status/503")
    wait_until(lambda: "is no longer eligible (ejected by outlier detection" in agent.log())
    ejected = [e for e, d in endpoints(agent).items() if not d["eligible"]]
    assert len(ejected) == 1
    left = {"b1", "b2"} - set(ejected)
    assert {get(c, "/")[2] for _ in range(4)} == {f"hello from {left.pop()}\n".encode()}


def test_http_connect_failure_and_reset_retried_for_idempotent(make_agent, backends):
    live = backends(1)
    dead = endpoint_toml("web", "127.0.0.1", refusing_port(), id="dead")
    port = free_port()
    agent = make_agent(catalog(live) + dead, proxy_config("web", port, "http", retries=2)
                       + "[services.web.outlier]\nconsecutive_failures = 1000\n").start()
    c = conn(port)
    for _ in range(10):
        assert get(c, "/")[2] == b"hello from b1\n"
    eps = endpoints(agent)
    assert eps["dead"]["proxy"]["failures"] >= 4


def test_http_reset_before_answer(make_agent, backends):
    """A reset before any answer: a GET moves on to another endpoint; a POST with a body
    gets 502 (it may have been acted on)."""
    b1, b2 = backends(2)
    port = free_port()
    agent = make_agent(catalog([b1, b2]), proxy_config("web", port, "http", retries=1)
                       + "[services.web.outlier]\nconsecutive_failures = 1000\n").start()
    # /reset resets on both backends: the GET tries both, then fails with 502.
    c = conn(port)
    status, _, body = get(c, "/reset")
    assert status == 502 and b"failed before answering" in body
    assert b1.hits["/reset"] == 1 and b2.hits["/reset"] == 1
    c = conn(port)
    status, _, _ = get(c, "/reset", "POST", b"data")
    assert status == 502
    assert b1.hits["/reset"] + b2.hits["/reset"] == 3  # no retry for the POST
    assert sum(e["proxy"]["failures"] for e in endpoints(agent).values()) == 3


def test_http_request_timeout_504(make_agent, backends):
    (b,) = backends(1)
    port = free_port()
    make_agent(catalog([b]), proxy_config("web", port, "http", request_timeout="300ms")).start()
    c = conn(port)
    t0 = time.monotonic()
    status, _, body = get(c, "/slow?s=2")
    assert status == 504 and time.monotonic() - t0 < 1.5
    c = conn(port)
    assert get(c, "/")[0] == 200


def test_http_routes_by_host_and_path(make_agent, backends):
    web, api, v2 = backends(1, "web"), backends(1, "api"), backends(1, "v2")
    port = free_port()
    cfg = proxy_config("web", port, "http") + """
[[services.web.proxy.routes]]
host = "api.local"
path_prefix = "/v2/"
service = "apiv2"

[[services.web.proxy.routes]]
host = "api.local"
service = "api"
"""
    make_agent(catalog(web) + catalog(api, "api") + catalog(v2, "apiv2"), cfg).start()
    c = conn(port)
    assert get(c, "/v2/x", headers={"Host": "API.local:9"})[1]["x-backend"] == v2[0].name
    assert get(c, "/v1/x", headers={"Host": "api.local"})[1]["x-backend"] == api[0].name
    assert get(c, "/v2/x", headers={"Host": "other"})[1]["x-backend"] == web[0].name


def test_http_upgrade_tunnels(make_agent, backends):
    (b,) = backends(1)
    port = free_port()
    make_agent(catalog([b]), proxy_config("web", port, "http")).start()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert recv_line(s).startswith(b"HTTP/1.1 101")
    while recv_line(s) != b"\r\n":
        pass
    for msg in (b"frame-1", b"frame-2" * 1000):
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            got += s.recv(65536)
        assert got == msg
    s.close()


def test_http_no_endpoint_503_and_bad_request_400(make_agent, backends):
    (b,) = backends(1)
    port = free_port()
    agent = make_agent(catalog([b]), proxy_config("web", port, "http")
                       + "[services.empty.proxy]\nlisten = \"127.0.0.1:%d\"\nmode = \"http\"\n" % (eport := free_port()))
    agent.start()
    c = conn(eport)
    status, _, body = get(c, "/")
    assert status == 503 and b"no endpoint for empty" in body
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GARBAGE\r\n\r\n")
    assert recv_line(s).startswith(b"HTTP/1.1 400")
    s.close()
    assert get(conn(port), "/")[0] == 200  # and the listener serves on


def test_http_kill_backend_mid_load_no_request_fails(make_agent):
    """The must-show: kill a backend while a client loops over one keep-alive connection;
    no request fails (connect retries), and the dead one stops getting work within the
    health bound (probe interval 200ms x fall 2)."""
    b = DemoBackends(3)
    try:
        port = free_port()
        cfg = proxy_config("web", port, "http") + """
[services.web.probe]
interval = "200ms"
timeout = "200ms"
fall = 2
rise = 1
"""
        agent = make_agent(b.catalog(), cfg).start()
        errors: list[str] = []
        seen: list[tuple[float, str]] = []
        stop = threading.Event()

        def load() -> None:
            c = conn(port)
            while not stop.is_set():
                try:
                    status, _, body = get(c, "/")
                    if status != 200:
                        errors.append(f"{status} {body!r}")
                    seen.append((time.monotonic(), body.decode().strip()))
                except Exception as e:  # noqa: BLE001 - any failure is the test's finding
                    errors.append(repr(e))
                    c = conn(port)

        t = threading.Thread(target=load)
        t.start()
        wait_until(lambda: len(seen) > 100)
        b.kill("web-2")
        killed = time.monotonic()
        time.sleep(2.0)
        stop.set()
        t.join(10)
        assert errors == []
        after = [name for at, name in seen if at > killed + 1.0]  # 2 x 200ms probes + slack
        assert after and "hello from web-2" not in after
        assert {n for _, n in seen if _ > killed} >= {"hello from web-1", "hello from web-3"}
        eps = endpoints(agent)
        assert not eps["web-2"]["eligible"]
    finally:
        b.stop()


def test_http_pipelined_requests_and_http10_client(make_agent, backends):
    b1, b2 = backends(2)
    port = free_port()
    make_agent(catalog([b1, b2]), proxy_config("web", port, "http")).start()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /echo?n=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /echo?n=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    f = s.makefile("rb")
    paths = []
    for _ in range(2):
        assert f.readline().startswith(b"HTTP/1.1 200")
        length = 0
        while (line := f.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        paths.append(json.loads(f.read(length))["path"])
    assert paths == ["/echo?n=1", "/echo?n=2"]  # answered in order, each picked on its own
    s.close()
    # An HTTP/1.0 client: its answer comes framed for it, and the connection then closes.
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /big?n=100000 HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()
    assert body == b"z" * 100000
    s.close()
