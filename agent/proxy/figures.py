"""Counters for the proxy: per listener and per endpoint, plain ints bumped in place.

Read by `softlb endpoints` / the admin API and by /metrics; never reset while the agent
runs (Prometheus counters), except `active`, which is a gauge.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class Figures:
    active: int = 0  # connections (tcp) or requests (http, http2) open now
    connections: int = 0  # accepted (listener) or opened upstream (endpoint), in total
    requests: int = 0  # http/http2 requests forwarded; tcp: connections forwarded
    bytes_in: int = 0  # client -> upstream
    bytes_out: int = 0  # upstream -> client
    failures: int = 0  # connect failures, resets, 5xx, grpc UNAVAILABLE
    retries: int = 0  # further endpoints tried after a failure

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class ProxyFigures:
    """All the proxy's figures: listeners by service, endpoints by (service, endpoint id)."""

    listeners: dict[str, Figures] = field(default_factory=dict)
    endpoints: dict[tuple[str, str], Figures] = field(default_factory=dict)
    #: HTTP/2 connections ended for breaking the protocol or a bound, by (who, error code):
    #: who is "client" or "upstream"; the code is what our GOAWAY said (ENHANCE_YOUR_CALM for
    #: a rapid reset or a CONTINUATION flood, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, ...).
    http2_errors: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    #: Times a listener stopped accepting because the agent's fds came within
    #: agent.fd_reserve of the limit (agent/proxy/fds.py).
    fd_waits: int = 0

    def listener(self, service: str) -> Figures:
        f = self.listeners.get(service)
        if f is None:
            f = self.listeners[service] = Figures()
        return f

    def endpoint(self, service: str, endpoint_id: str) -> Figures:
        key = (service, endpoint_id)
        f = self.endpoints.get(key)
        if f is None:
            f = self.endpoints[key] = Figures()
        return f

    def prune(self, services: Any) -> None:
        """Forget endpoints the catalog no longer lists (once idle), so churn cannot grow
        this table (or the metric series) without bound."""
        for key in [k for k, f in self.endpoints.items() if not f.active]:
            b = services.get(key[0])
            if b is None or key[1] not in b.by_id:
                del self.endpoints[key]

    def for_service(self, service: str) -> dict[str, dict[str, int]]:
        return {eid: f.as_dict() for (s, eid), f in self.endpoints.items() if s == service}


#: Metric name suffix, kind, help, Figures field.
METRICS = (
    ("active", "gauge", "Proxied connections (tcp) or requests (http, http2) open now.", "active"),
    ("connections_total", "counter", "Connections accepted (listener) or opened (endpoint).", "connections"),
    ("requests_total", "counter", "Requests (tcp: connections) forwarded.", "requests"),
    ("received_bytes_total", "counter", "Bytes from clients towards endpoints.", "bytes_in"),
    ("sent_bytes_total", "counter", "Bytes from endpoints back to clients.", "bytes_out"),
    ("failures_total", "counter", "Failed connects, resets, 5xx and gRPC UNAVAILABLE answers.", "failures"),
    ("retries_total", "counter", "Further endpoints tried after a failure.", "retries"),
)


def with_proxy_figures(figures: ProxyFigures, service: str, result: Any) -> Any:
    """An `endpoints` result with the proxy's figures added: `proxy` on each endpoint and
    `proxy_listener` for the service's own listener, when the proxy has any for it. (The
    core describes the service; the figures live in the agent.)"""
    per = figures.for_service(service)
    lst = figures.listeners.get(service)
    if (not per and lst is None) or not isinstance(result, dict):
        return result
    result = dict(result)
    result["endpoints"] = [dict(e, proxy=per.get(e.get("id"), Figures().as_dict())) for e in result.get("endpoints", [])]
    if lst is not None:
        result["proxy_listener"] = lst.as_dict()
    return result
