"""The loopback admin HTTP port: a curl-able read API and Prometheus metrics.

    GET /healthz                 200 "ok" once the catalog is loaded
    GET /v1/services             the services table (JSON)
    GET /v1/services/NAME        one service's endpoints and state (JSON)
    GET /v1/resolve/NAME?key=K&tag=T&lease=1
                                 one pick: the wire protocol's resolve result (JSON)
    POST /v1/report?lease=N&ok=false&latency=0.2
                                 an outcome, as the protocol's report (or service=&endpoint=)
    GET /metrics                 Prometheus text format

Everything but /healthz and /metrics goes through the wire protocol's own entry point
(`Engine.handle`), so HTTP callers get the same argument checks, error codes, on-demand
Consul fetches and JSON as socket callers; errors map to 400/404/503 with the code in the
body.

HTTP/1.1 with `Connection: close`: one request per connection keeps the parser to a
request line and headers, which is all curl and Prometheus need. Requests are bounded in
size and time; anything else gets a 4xx and the port keeps serving.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.parse
from typing import Any

import trio

from softlb import (Endpoints, LeaseScope, Pending, Pick, ProbeState, Rejected, Reported, RequestError, Resolve,
                    parse_request, respond)

from .proxy.figures import proxy_metrics, with_proxy_figures
from .runtime import Runtime

log = logging.getLogger("softlb.admin")

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable",
            413: "Request Header Fields Too Large", 408: "Request Timeout"}
_STATUS_OF = {"UNKNOWN_SERVICE": 404, "NO_HEALTHY_ENDPOINT": 503, "UNAVAILABLE": 503, "BAD_ARGUMENT": 400,
              "UNKNOWN_LEASE": 404, "UNKNOWN_OP": 404}


async def serve_admin(rt: Runtime, listener: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    tl = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
    task_status.started()
    await trio.serve_listeners(lambda stream: _handle(rt, stream), [tl])


async def _handle(rt: Runtime, stream: trio.SocketStream) -> None:
    try:
        status, ctype, body = 408, "text/plain", b"request timeout\n"
        with trio.move_on_after(REQUEST_TIMEOUT):
            status, ctype, body = await _respond(rt, stream)
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        with trio.move_on_after(REQUEST_TIMEOUT):
            await stream.send_all(head + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        # A bug behind one admin request ends that request, never the agent: the handler
        # runs in the agent's root nursery, where an escaping error would stop everything.
        log.exception("admin request failed")
        rt.stats.errors["INTERNAL"] += 1
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                await stream.send_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    finally:
        await trio.aclose_forcefully(stream)


async def _respond(rt: Runtime, stream: trio.SocketStream) -> tuple[int, str, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_REQUEST:
            return 413, "text/plain", b"request too large\n"
        data = await stream.receive_some(4096)
        if not data:
            return 400, "text/plain", b"incomplete request\n"
        buf += data
    line = buf.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return 400, "text/plain", b"bad request line\n"
    method, target = parts[0], parts[1]
    url = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qsl(url.query)
    try:
        source = str(stream.socket.getpeername()[0])
    except OSError:
        source = "http"
    return await route(rt, method, urllib.parse.unquote(url.path), query, source)


def _json(status: int, obj: Any) -> tuple[int, str, bytes]:
    return status, "application/json", (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _error(status: int, code: str, message: str) -> tuple[int, str, bytes]:
    return _json(status, {"error": {"code": code, "message": message}})


def _flag(value: str) -> bool | str:
    """Query-string booleans as people write them; anything else stays a string, which the
    protocol's own argument check then refuses with BAD_ARGUMENT."""
    return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(value.lower(), value)


def _number(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


async def ask(rt: Runtime, msg: dict[str, Any], source: str) -> tuple[int, str, bytes]:
    """Answer through the protocol's own typed requests and the core's typed API, so HTTP and
    socket callers get the same checks, the same on-demand fetches and the same results."""
    msg["id"] = 0
    req = parse_request(msg)
    try:
        if type(req) is Rejected:
            raise RequestError(req.code, req.message)
        r = respond(rt.engine, req, trio.current_time(), source)
        if type(r) is Pending:  # a catalog source is fetching it: wait as every front end does
            assert type(req) is Resolve
            r = await rt.pick(req.service, key=req.key, tags=req.tags, source=source,
                              scope=LeaseScope.REQUEST if req.lease else LeaseScope.NONE)
        rt.flush()
    except RequestError as e:
        return _json(_STATUS_OF.get(e.code.value, 400), {"error": {"code": e.code.value, "message": e.message}})
    if type(r) is Pick:
        return _json(200, r.as_dict())
    if type(r) is Reported:
        rt.dispatch(r.changes)
        return _json(200, {})
    if type(req) is Endpoints and rt.proxy_figures is not None:
        r = with_proxy_figures(rt.proxy_figures, req.service, r)
    return _json(200, r)


async def route(rt: Runtime, method: str, path: str, query: list[tuple[str, str]], source: str) -> tuple[int, str, bytes]:
    q = dict(query)
    if method not in ("GET", "HEAD") and not (method == "POST" and path == "/v1/report"):
        return 405, "text/plain", b"GET, or POST /v1/report\n"
    if path == "/healthz":
        if rt.catalog_ready.is_set():
            return 200, "text/plain", b"ok\n"
        return 503, "text/plain", b"catalog not loaded\n"
    if path == "/metrics":
        return 200, "text/plain; version=0.0.4", render_metrics(rt).encode()
    if path == "/v1/services":
        return await ask(rt, {"op": "services"}, source)
    if path.startswith("/v1/services/"):
        return await ask(rt, {"op": "endpoints", "service": path[len("/v1/services/"):]}, source)
    if path.startswith("/v1/resolve/"):
        msg: dict[str, Any] = {"op": "resolve", "service": path[len("/v1/resolve/"):],
                               "lease": _flag(q.get("lease", "false"))}
        if "key" in q:
            msg["key"] = q["key"]
        tags = [v for k, v in query if k == "tag"]
        if tags:
            msg["tags"] = tags
        return await ask(rt, msg, source)
    if path == "/v1/report":
        if method != "POST":
            return 405, "text/plain", b"POST /v1/report\n"
        msg = {"op": "report", "ok": _flag(q.get("ok", "true"))}
        if "lease" in q:
            # isascii: str.isdigit() is true for "²", which int() refuses.
            msg["lease"] = int(q["lease"]) if q["lease"].isascii() and q["lease"].isdigit() else q["lease"]
        if "latency" in q:
            msg["latency"] = _number(q["latency"])
        for k in ("service", "endpoint"):
            if k in q:
                msg[k] = q[k]
        return await ask(rt, msg, source)
    return _error(404, "NOT_FOUND", f"no route {path}")


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def render_metrics(rt: Runtime) -> str:
    """Prometheus text format: each metric's HELP, TYPE and samples together."""
    s = rt.stats
    now = trio.current_time()
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float | int]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("softlb_requests_total", "counter", "Wire-protocol requests received.", [("", s.requests)])
    metric("softlb_errors_total", "counter", "Protocol errors answered at frame level, and INTERNAL errors, by code.",
           [(f'{{code="{_label(c)}"}}', n) for c, n in sorted(s.errors.items())])
    metric("softlb_busy_poll_total", "counter", "Spins after an answer, by whether they found the next request.",
           [('{result="hit"}', s.busy_poll_hits), ('{result="miss"}', s.busy_poll_misses)])
    metric("softlb_connections_open", "gauge", "Client connections open now.", [("", s.connections_open)])
    metric("softlb_connections_total", "counter", "Client connections accepted.", [("", s.connections_total)])
    metric("softlb_catalog_reloads_total", "counter", "Catalog loads applied (file source).", [("", s.catalog_reloads)])
    metric("softlb_catalog_errors_total", "counter", "Catalog loads refused; the last good catalog kept serving.",
           [("", s.catalog_errors)])
    metric("softlb_config_reload_errors_total", "counter", "Config reloads refused; the running config stayed.",
           [("", s.config_reload_errors)])
    metric("softlb_leases_open", "gauge", "Leases handed out by resolve and not yet reported or expired.",
           [("", len(rt.engine.leases))])

    # DNS front end (agent/dns.py): answers by transport and rcode; "dropped" and "refused"
    # are datagrams not answered and TCP connections closed at the cap.
    dns_answers = sorted(k.split(":", 1) for k in s.dns)
    metric("softlb_dns_queries_total", "counter", "DNS queries by transport and answer code.",
           [(f'{{transport="{t}",rcode="{_label(c)}"}}', s.dns[f"{t}:{c}"]) for t, c in dns_answers])

    services = [(f'{{service="{_label(n)}"}}', rt.engine.services[n]) for n in sorted(rt.engine.services)]
    snaps = {lbl: b.health.snapshot(now).endpoints for lbl, b in services}
    per_service = [
        ("softlb_service_endpoints", "gauge", "Endpoints the catalog lists.", lambda lbl, b: len(b.endpoints)),
        ("softlb_service_eligible_endpoints", "gauge", "Endpoints passing registry, probe and outlier checks.",
         lambda lbl, b: b.eligible_count),
        ("softlb_service_ejected_endpoints", "gauge", "Endpoints ejected by passive outlier detection.",
         lambda lbl, b: sum(r.ejected for r in snaps[lbl])),
        ("softlb_service_probe_down_endpoints", "gauge", "Endpoints the active probe holds down.",
         lambda lbl, b: sum(r.probe is ProbeState.DOWN for r in snaps[lbl])),
        ("softlb_service_ejections_total", "counter", "Outlier ejections of the endpoints listed now.",
         lambda lbl, b: sum(r.ejections for r in snaps[lbl])),
        ("softlb_service_panic", "gauge", "1 while too few endpoints are eligible and all are balanced over.",
         lambda lbl, b: int(b.panic)),
        ("softlb_service_stale", "gauge", "1 while answers come from old data (the catalog source is unreachable).",
         lambda lbl, b: int(b.stale)),
    ]
    for name, kind, help_, value in per_service:
        metric(name, kind, help_, [(lbl, value(lbl, b)) for lbl, b in services])
    # Only sources that fetch (Consul) have a meaningful age; a file catalog is as fresh
    # as the file, and an ever-growing age would page someone for nothing.
    metric("softlb_service_data_age_seconds", "gauge", "Seconds since the catalog source last confirmed this data.",
           [(lbl, f"{max(0.0, now - b.fetched_at):.3f}") for lbl, b in services
            if b.fetched_at is not None and rt.config.source != "file"])
    if rt.proxy_figures is not None:
        proxy_metrics(rt.proxy_figures, metric)
    # The catalog source's own counters (the Consul source sets this; the file source not).
    source_metrics = getattr(rt, "source_metrics", None)
    if source_metrics is not None:
        for m in source_metrics():
            metric(*m)
    return "\n".join(out) + "\n"
