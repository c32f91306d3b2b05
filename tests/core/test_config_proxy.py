"""[services.NAME.proxy]: parsing, validation, routes."""

import pytest

from softlb import ConfigError, ProxyConfig, ProxyRoute, parse_agent_config, route
from softlb._config import with_overrides


def parse(proxy: dict, **agent: object) -> ProxyConfig:
    doc = {"services": {"web": {"proxy": proxy}}}
    if agent:
        doc["agent"] = agent
    p = parse_agent_config(doc).services["web"].proxy
    assert p is not None
    return p


def test_defaults_and_values():
    p = parse({"listen": "127.0.0.1:9000"})
    assert p == ProxyConfig(listen="127.0.0.1:9000")
    assert p.mode == "tcp" and p.retries == 2 and p.max_connections == 1024
    p = parse({"listen": "[::1]:9000", "mode": "http2", "connect_timeout": "250ms", "idle_timeout": "1m",
               "request_timeout": "5s", "retries": 0, "drain_timeout": "2s", "max_connections": 10})
    assert (p.mode, p.connect_timeout, p.idle_timeout, p.request_timeout, p.retries, p.drain_timeout,
            p.max_connections) == ("http2", 0.25, 60.0, 5.0, 0, 2.0, 10)


def test_no_proxy_by_default():
    assert parse_agent_config({"services": {"web": {}}}).services["web"].proxy is None


@pytest.mark.parametrize("proxy, where", [
    ({}, "services.web.proxy.listen: required"),
    ({"listen": "9000"}, "services.web.proxy.listen: expected HOST:PORT"),
    ({"listen": "0.0.0.0:9000"}, "not a loopback address"),
    ({"listen": "127.0.0.1:9000", "mode": "udp"}, "services.web.proxy.mode"),
    ({"listen": "127.0.0.1:9000", "retries": 11}, "services.web.proxy.retries"),
    ({"listen": "127.0.0.1:9000", "max_connections": 0}, "services.web.proxy.max_connections"),
    ({"listen": "127.0.0.1:9000", "connect_timeout": "0s"}, "services.web.proxy.connect_timeout: must be positive"),
    ({"listen": "127.0.0.1:9000", "idle_timeout": "soon"}, "services.web.proxy.idle_timeout"),
    ({"listen": "127.0.0.1:9000", "bogus": 1}, "services.web.proxy.bogus: unknown setting"),
    ({"listen": "127.0.0.1:9000", "routes": [{"host": "a", "service": "x"}]}, "a tcp listener cannot route"),
    ({"listen": "127.0.0.1:9000", "mode": "http", "routes": [{"host": "a"}]}, "routes[0].service: required"),
    ({"listen": "127.0.0.1:9000", "mode": "http", "routes": [{"service": "x"}]}, "routes[0]: give host"),
    ({"listen": "127.0.0.1:9000", "mode": "http", "routes": [{"service": "x", "path_prefix": "v1"}]},
     "routes[0].path_prefix: must start with /"),
    ({"listen": "127.0.0.1:9000", "mode": "http", "routes": {"service": "x"}}, "expected an array of tables"),
])
def test_bad_proxy_settings_name_the_key(proxy, where):
    with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
        parse(proxy)


def test_non_loopback_when_allowed():
    assert parse({"listen": "0.0.0.0:9000"}, allow_non_loopback=True).listen == "0.0.0.0:9000"


def test_two_listeners_on_one_address_refused():
    doc = {"services": {"a": {"proxy": {"listen": "127.0.0.1:9000"}},
                        "b": {"proxy": {"listen": "localhost:9000"}}}}
    with pytest.raises(ConfigError, match="services.b.proxy.listen: localhost:9000 is also services.a's"):
        parse_agent_config(doc)


def test_override_cannot_sneak_a_non_loopback_proxy_past_allow():
    cfg = parse_agent_config({"agent": {"allow_non_loopback": True},
                              "services": {"web": {"proxy": {"listen": "0.0.0.0:9000"}}}})
    with pytest.raises(ConfigError, match="services.web.proxy.listen"):
        with_overrides(cfg, allow_non_loopback=False)


def test_routes_first_match_wins_host_without_port_case_insensitive():
    routes = (ProxyRoute("api-v2", host="api.local", path_prefix="/v2"),
              ProxyRoute("api", host="api.local"),
              ProxyRoute("static", path_prefix="/static/"))
    assert route(routes, "web", "API.local:8080", "/v2/x") == "api-v2"
    assert route(routes, "web", "api.local", "/v1/x") == "api"
    assert route(routes, "web", "other", "/static/a.css") == "static"
    assert route(routes, "web", "other", "/") == "web"
    assert route(routes, "web", "[::1]:80", "/") == "web"
    assert route((), "web", "api.local", "/v2") == "web"
    p = parse({"listen": "127.0.0.1:9000", "mode": "http",
               "routes": [{"host": "API.local", "path_prefix": "/v2", "service": "api-v2"}]})
    assert p.routes == (ProxyRoute("api-v2", host="api.local", path_prefix="/v2"),)
