"""Counters for the proxy: per listener and per endpoint, plain ints bumped in place.

Read by `softlb endpoints` / the admin API and by /metrics; never reset while the agent
runs (Prometheus counters), except `active`, which is a gauge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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

    def for_service(self, service: str) -> dict[str, dict[str, int]]:
        return {eid: f.as_dict() for (s, eid), f in self.endpoints.items() if s == service}


def annotate(figures: ProxyFigures | None, msg: object, frame: bytes | None) -> bytes | None:
    """An `endpoints` answer with the proxy's figures added: `proxy` on each endpoint that
    has any, and `proxy_listener` for the service's own listener. Other frames pass as they
    are. (The core answers the op; the figures live in the agent.)"""
    if figures is None or frame is None or not isinstance(msg, dict) or msg.get("op") != "endpoints":
        return frame
    service = msg.get("service")
    per = figures.for_service(service) if isinstance(service, str) else {}
    lst = figures.listeners.get(service) if isinstance(service, str) else None
    if not per and lst is None:
        return frame
    import msgpack

    from softlb._wire import encode_frame

    answer = msgpack.unpackb(frame[4:], raw=False)
    result = answer.get("result")
    if not isinstance(result, dict):
        return frame
    for e in result.get("endpoints", []):
        e["proxy"] = per.get(e.get("id"), Figures().as_dict())
    if lst is not None:
        result["proxy_listener"] = lst.as_dict()
    return encode_frame(answer)
