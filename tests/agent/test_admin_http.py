"""The admin port on h11, against a real agent over real sockets: routes, HEAD, keep-alive,
bounds, and the cross-site / DNS-rebinding refusals (issue 10, item 10)."""

import json
import socket

import pytest

from agentproc import THREE, endpoint_toml

SECRET = "s3cr3t-token-value"


@pytest.fixture
def agent(make_agent):
    return make_agent(THREE + endpoint_toml("web", "127.0.0.1", 18009, id="web-9", tags=["canary"]),
                      config=f'[consul]\ntoken = "{SECRET}"\n').start()


def raw(agent, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes."""
    s = socket.create_connection(("127.0.0.1", agent.admin_port), timeout=timeout)
    try:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
    finally:
        s.close()


def request(agent, method: str, path: str, headers: dict | None = None, body: bytes = b"") -> tuple[int, dict, bytes]:
    hdrs = {"Host": f"127.0.0.1:{agent.admin_port}", "Connection": "close", **(headers or {})}
    if body:
        hdrs["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    resp = raw(agent, head.encode() + body)
    head_bytes, _, rest = resp.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    h = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, h, rest


def test_index_lists_every_route(agent):
    from softlb_agent.admin import ROUTES

    status, _, body = request(agent, "GET", "/")
    assert status == 200
    for r in ROUTES:
        assert r.pattern in body.decode()
    status, _, body = request(agent, "GET", "/?format=json")
    assert {r["path"] for r in json.loads(body)} == {r.pattern for r in ROUTES}


def test_head_has_no_body_but_the_same_length(agent):
    _, gh, gbody = request(agent, "GET", "/v1/services")
    status, hh, hbody = request(agent, "HEAD", "/v1/services")
    assert status == 200 and hbody == b"" and hh["content-length"] == gh["content-length"] == str(len(gbody))


def test_keep_alive_answers_several_requests_on_one_connection(agent):
    host = f"Host: 127.0.0.1:{agent.admin_port}\r\n"
    data = (f"GET /healthz HTTP/1.1\r\n{host}\r\n" * 2 + f"GET /readyz HTTP/1.1\r\n{host}Connection: close\r\n\r\n").encode()
    resp = raw(agent, data)
    assert resp.count(b"HTTP/1.1 200") == 3 and resp.endswith(b"ready\n")


def test_oversized_headers_get_431_and_the_port_keeps_serving(agent):
    resp = raw(agent, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 431")
    assert request(agent, "GET", "/healthz")[0] == 200


def test_a_5000_digit_lease_is_a_400_not_a_traceback(agent):
    status, _, body = request(agent, "POST", "/v1/report?lease=" + "9" * 5000)
    assert status == 400 and json.loads(body)["error"]["code"] == "BAD_ARGUMENT"
    assert "Traceback" not in agent.log() and "admin request failed" not in agent.log()
    assert agent.client().resolve("web")


@pytest.mark.parametrize("host", ["evil.example", "evil.example:7071", "rebind.attacker.test", "10.1.2.3"])
def test_a_host_that_is_not_loopback_is_refused(agent, host):
    status, _, body = request(agent, "GET", "/v1/services", {"Host": host})
    assert status == 421 and json.loads(body)["error"]["code"] == "MISDIRECTED"


@pytest.mark.parametrize("host", ["localhost", "localhost:1", "127.0.0.1", "[::1]:7071", "127.0.0.2"])
def test_loopback_hosts_are_served(agent, host):
    assert request(agent, "GET", "/healthz", {"Host": host})[0] == 200


def test_cross_site_posts_are_refused_and_curl_posts_pass(agent):
    lease = json.loads(request(agent, "GET", "/v1/resolve/web?lease=1")[2])["lease"]
    path = f"/v1/report?lease={lease}&ok=false"
    assert request(agent, "POST", path, {"Origin": "http://evil.example"})[0] == 403
    assert request(agent, "POST", path, {"Sec-Fetch-Site": "cross-site"})[0] == 403
    status, _, body = request(agent, "POST", path, {"Content-Type": "application/x-www-form-urlencoded"}, b"x=1")
    assert status == 415 and "curl -X POST" in json.loads(body)["error"]["message"]
    assert request(agent, "POST", path, {"Content-Type": "text/plain"}, b"x")[0] == 415
    # nothing above reached the engine: the lease is still open
    assert request(agent, "POST", path, {"Origin": f"http://127.0.0.1:{agent.admin_port}"})[0] == 200
    assert request(agent, "POST", path)[0] == 404  # already reported


def test_wrong_method_is_405_with_allow(agent):
    status, h, _ = request(agent, "POST", "/v1/services")
    assert status == 405 and h["allow"] == "GET, HEAD"
    assert request(agent, "GET", "/v1/report")[0] == 405


def test_config_is_effective_with_defaults_and_redacts_the_token(agent):
    status, _, body = request(agent, "GET", "/v1/config")
    assert status == 200 and SECRET.encode() not in body
    cfg = json.loads(body)["config"]
    assert cfg["consul"]["token"] == "(redacted)" and cfg["lease_ttl"] == 60.0 and cfg["admin"].endswith(str(agent.admin_port))


def test_status_readyz_and_endpoint_detail(agent):
    st = json.loads(request(agent, "GET", "/v1/status")[2])
    assert st["ready"] is True and st["services"][0]["name"] == "web" and st["source"]["kind"] == "file"
    assert st["clients_connected"] == 0 and st["version"]
    assert request(agent, "GET", "/readyz")[0] == 200
    status, _, body = request(agent, "GET", "/v1/services/web/endpoints/web-9")
    d = json.loads(body)
    assert status == 200 and d["id"] == "web-9" and d["why"]["served"] is True and d["service"] == "web"
    assert request(agent, "GET", "/v1/services/web/endpoints/nope")[0] == 404


def test_garbage_and_silence(agent):
    assert raw(agent, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(agent, b"GET / HTTP/1.1\r\n", timeout=10).startswith(b"HTTP/1.1 408")
