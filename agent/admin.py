"""The loopback admin HTTP port: a curl-able read API, status and Prometheus metrics.

Routes (ROUTES below is the one list; `GET /` prints it):

    GET  /                                   this index
    GET  /healthz                            200 while the agent's loop answers (liveness)
    GET  /readyz                             200 once the catalog is loaded and the last config
                                             and catalog reloads applied; 503 with the reason
    GET  /metrics                            Prometheus text format (agent/metrics.py)
    GET  /v1/status                          version, uptime, source, reloads, services, listeners
    GET  /v1/config                          the effective config with defaults (secrets redacted)
    GET  /v1/services                        the services table
    GET  /v1/services/NAME                   one service's endpoints, each with why it is (not) served
    GET  /v1/services/NAME/endpoints/ID      one endpoint of it
    GET  /v1/resolve/NAME?key=K&tag=T&lease=1  one pick: the wire protocol's resolve result
    POST /v1/report?lease=N&ok=false&latency=0.2  an outcome (or service=&endpoint=)

HTTP/1.1 on h11: one request loop per connection, keep-alive when the client wants it, HEAD
answered without a body, headers bounded (431 past MAX_HEADER_BYTES) and every request
bounded in time (REQUEST_TIMEOUT, idle time between keep-alive requests included).

Who may ask (issue 10, cross-site requests and DNS rebinding): the Host header must name a
loopback address, `localhost`, or the configured admin address; a page in a browser on
this host that got a DNS name rebound to 127.0.0.1 sends its own name and is refused. POST
(the only mutation) is refused when an Origin other than loopback comes with it, when the
browser marks it cross-site (Sec-Fetch-Site), or when it carries a form body type (the
only POSTs a page can make without a CORS preflight): curl's `-X POST` sends none of these.

Everything about services goes through `ask`, the one place admin reaches the engine, so
HTTP callers get the same argument checks, error codes, on-demand Consul fetches and JSON
as socket callers; errors map to 400/404/503 with the code in the body.
"""

from __future__ import annotations

import http
import ipaddress
import json
import logging
import os
import socket
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

import h11
import trio

from softlb import (Endpoints, LeaseScope, Pending, Pick, Rejected, Reported, RequestError, Resolve, __version__,
                    parse_request, respond)

from . import metrics
from .listeners import Connection, ConnectionBudget, ConnectionLimits, serve_listener
from .paths import default_socket_path
from .proxy.figures import with_proxy_figures
from .runtime import Runtime

log = logging.getLogger("softlb.admin")

MAX_HEADER_BYTES = 8192
REQUEST_TIMEOUT = 5.0
#: Bodies are not part of this API (arguments are query parameters); a small one is read
#: and ignored, a bigger one ends the connection.
MAX_BODY = 4096
#: Requests answered on one keep-alive connection before it is closed.
MAX_REQUESTS_PER_CONNECTION = 1000
#: After an error answer, how long unread input is drained before closing.
LINGER = 1.0
#: Lease ids are 63-bit integers; anything longer is refused before int() sees it
#: (Python refuses to convert over 4,300 digits, with an exception).
MAX_LEASE_DIGITS = 20

_STATUS_OF = {"UNKNOWN_SERVICE": 404, "NO_HEALTHY_ENDPOINT": 503, "UNAVAILABLE": 503, "BAD_ARGUMENT": 400,
              "UNKNOWN_LEASE": 404, "UNKNOWN_OP": 404}
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    source: str

    def arg(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.query:
            if k == name:
                return v
        return default


Handler = Callable[["Admin", Request, dict[str, str]], Awaitable[Response]]


def _json(status: int, obj: Any) -> Response:
    return Response(status, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), "application/json")


def _error(status: int, code: str, message: str) -> Response:
    return _json(status, {"error": {"code": code, "message": message}})


def _text(status: int, text: str) -> Response:
    return Response(status, (text + "\n").encode())


# ------------------------------------------------------------------------ serving


#: The admin port's own caps: operators and scrapers, not the host's callers. Its
#: connections count in the agent's open connections and join the drain at stop.
ADMIN_LIMITS = ConnectionLimits(max_connections=64, max_connections_per_uid=64, idle_timeout=60.0)


def _busy_answer(why: str) -> bytes:
    body = f"the admin port is at its connection limit ({why})\n".encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def serve_admin(rt: Runtime, listener: socket.socket, *, draining: trio.Event | None = None,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the admin port on the agent's one listener module (caps, idle timeout, drain)
    until `draining` is set and every admin connection has finished its request."""
    host = (rt.config.admin.rpartition(":")[0] or "").strip("[]")
    app = Admin(rt, host)
    budget = ConnectionBudget(ADMIN_LIMITS, rt.stats, counted_as="admin_connections")
    await serve_listener(listener, app.handle, budget, name="admin", draining=draining,
                         refuse=_busy_answer, task_status=task_status)


class Admin:
    def __init__(self, rt: Runtime, admin_host: str = "") -> None:
        self.rt = rt
        self.admin_host = admin_host.lower()
        self.registry = metrics.make_registry(rt)

    async def handle(self, lconn: Connection) -> None:
        """One admin connection from the listener module: requests until the peer is done,
        the keep-alive limit, or the drain (which ends it between requests, never inside one)."""
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(lconn.sock))
        await self.connection(stream, lconn)

    async def connection(self, stream: trio.SocketStream, lconn: Connection | None = None) -> None:
        try:
            source = str(stream.socket.getpeername()[0])
        except OSError:
            source = "http"
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                if lconn is not None:
                    if not conn.trailing_data[0]:
                        await lconn.wait_readable()  # returns early when the drain starts
                    if lconn.draining and not conn.trailing_data[0]:
                        break  # between requests: closing now loses nothing
                    lconn.touch()
                if not await self._one(conn, stream, source):
                    break
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass
        except Exception:
            # A bug behind one request ends that connection, never the agent: this runs in
            # the agent's root nursery, where an escaping error would stop everything.
            log.exception("admin request failed")
            self.rt.stats.errors["INTERNAL"] += 1
            await self._send_plain(conn, stream, Response(500, b"internal error (logged)\n"))
        finally:
            await trio.aclose_forcefully(stream)

    async def _one(self, conn: h11.Connection, stream: trio.SocketStream, source: str) -> bool:
        """Read one request and answer it; False when the connection should end."""
        req: h11.Request | None = None
        with trio.move_on_after(REQUEST_TIMEOUT) as cs:
            try:
                req = await self._read_request(conn, stream)
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint
                msg = "request headers too large" if status == 431 else f"bad request: {e}"
                await self._send_plain(conn, stream, _text(status, msg))
                return False
        if cs.cancelled_caught:
            if conn.their_state is h11.SEND_BODY or (conn.their_state is h11.IDLE and conn.trailing_data[0]):
                await self._send_plain(conn, stream, _text(408, "request timeout"))
            return False
        if req is None:
            return False
        target = req.target.decode("latin-1")
        url = urllib.parse.urlsplit(target)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in req.headers}
        r = Request(req.method.decode("latin-1"), urllib.parse.unquote(url.path),
                    urllib.parse.parse_qsl(url.query, keep_blank_values=True), headers, source)
        resp = await self.dispatch(r)
        await self._send(conn, stream, resp, head=r.method == "HEAD")
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _read_request(self, conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
        req: h11.Request | None = None
        body = 0
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await stream.receive_some(4096)
                conn.receive_data(data)
                continue
            if isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                body += len(ev.data)
                if body > MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(ev, h11.EndOfMessage):
                return req
            elif isinstance(ev, h11.ConnectionClosed):
                return None
            else:  # pragma: no cover - h11 yields nothing else to a server
                return None

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, resp: Response, head: bool = False) -> None:
        headers = [("Content-Type", resp.content_type), ("Content-Length", str(len(resp.body))),
                   ("Cache-Control", "no-store"), *resp.headers]
        data = conn.send(h11.Response(status_code=resp.status, headers=headers, reason=_reason(resp.status)))
        if not head and resp.body:
            data += conn.send(h11.Data(data=resp.body))
        data += conn.send(h11.EndOfMessage())
        with trio.move_on_after(REQUEST_TIMEOUT):
            await stream.send_all(data)

    async def _send_plain(self, conn: h11.Connection, stream: trio.SocketStream, resp: Response) -> None:
        """An answer to a request h11 could not parse: written by hand, then close."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        head = (f"HTTP/1.1 {resp.status} {_reason(resp.status).decode()}\r\nContent-Type: {resp.content_type}\r\n"
                f"Content-Length: {len(resp.body)}\r\nConnection: close\r\n\r\n").encode()
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                await stream.send_all(head + resp.body)
                # Lingering close: closing with unread input would send a reset, which can
                # destroy the answer before the client reads it. Read (bounded) and drop.
                await stream.send_eof()
                with trio.move_on_after(LINGER):
                    for _ in range(16):
                        if not await stream.receive_some(65536):
                            break
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # -------------------------------------------------------------------- routing

    async def dispatch(self, req: Request) -> Response:
        refused = self.refuse(req)
        if refused is not None:
            return refused
        method = "GET" if req.method == "HEAD" else req.method
        for route in ROUTES:
            params = route.match(req.path)
            if params is None:
                continue
            if method != route.method:
                allow = route.method + (", HEAD" if route.method == "GET" else "")
                return Response(405, f"{req.path}: use {route.method}\n".encode(), headers=[("Allow", allow)])
            return await route.handler(self, req, params)
        return _error(404, "NOT_FOUND", f"no route {req.path[:200]} (GET / lists them)")

    def refuse(self, req: Request) -> Response | None:
        """The Host/Origin checks in the module docstring; None when the request may go on."""
        host = req.headers.get("host")
        if host is None or not self._host_ok(host):
            return _error(421, "MISDIRECTED", f"Host {(host or '(none)')[:100]!r} is not this agent's admin address: "
                          "use 127.0.0.1, localhost or the configured agent.admin address")
        if req.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return _error(403, "CROSS_SITE", "cross-site requests are refused")
        if req.method not in ("GET", "HEAD"):
            origin = req.headers.get("origin")
            if origin is not None and not self._host_ok(urllib.parse.urlsplit(origin).netloc or origin):
                return _error(403, "CROSS_SITE", f"Origin {origin[:100]!r} may not change this agent's state")
            ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype in _FORM_TYPES:
                return _error(415, "FORM_POST", f"a {ctype} body is refused (browsers send those cross-site); pass "
                              "arguments in the query string with no body: curl -X POST 'HOST/v1/report?lease=N'")
        return None

    def _host_ok(self, hostport: str) -> bool:
        host = hostport.strip().lower()
        if host.startswith("["):
            host = host[1:].split("]", 1)[0]
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        if host in ("localhost", "localhost.") or host.endswith(".localhost") or (host and host == self.admin_host):
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False  # a DNS name other than localhost: what a rebinding attack sends
        if ip.is_loopback:
            return True
        # Listening on a wildcard address (allow_non_loopback): an IP literal cannot be
        # rebound, so any address of this host is fine.
        return self.admin_host in ("0.0.0.0", "::")


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    handler: Handler
    help: str

    def match(self, path: str) -> dict[str, str] | None:
        want = self.pattern.strip("/").split("/")
        got = path.strip("/").split("/")
        if len(want) != len(got):
            return None
        params = {}
        for w, g in zip(want, got):
            if w.startswith("{"):
                if not g:
                    return None
                params[w[1:-1]] = g
            elif w != g:
                return None
        return params


# ------------------------------------------------------------------------ the engine


def _flag(value: str) -> bool | str:
    """Query-string booleans as people write them; anything else stays a string, which the
    protocol's own argument check then refuses with BAD_ARGUMENT."""
    return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(value.lower(), value)


def _number(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


async def ask(rt: Runtime, msg: dict[str, Any], source: str) -> tuple[int, Any]:
    """The one place admin reaches the engine: the request goes through the protocol's own
    typed requests (`parse_request`, the same argument checks as the socket) and the core's
    typed API (`respond`; `rt.pick` when a catalog source must be awaited), so HTTP and socket
    callers get the same errors, on-demand fetches and results. Returns (HTTP status, result
    or {"error": ...})."""
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
        rt.stats.errors[e.code.value] += 1
        return _STATUS_OF.get(e.code.value, 400), {"error": {"code": e.code.value, "message": e.message}}
    if type(r) is Pick:
        return 200, r.as_dict()
    if type(r) is Reported:
        rt.dispatch(r.changes)
        return 200, {}
    if type(req) is Endpoints and rt.proxy_figures is not None:
        r = with_proxy_figures(rt.proxy_figures, req.service, r)
    return 200, r


async def _asked(rt: Runtime, msg: dict[str, Any], source: str) -> Response:
    return _json(*await ask(rt, msg, source))


# ------------------------------------------------------------------------ handlers


async def h_index(app: Admin, req: Request, p: dict[str, str]) -> Response:
    if "json" in (req.headers.get("accept") or "") or req.arg("format") == "json":
        return _json(200, [{"method": r.method, "path": r.pattern, "help": r.help} for r in ROUTES])
    width = max(len(r.method) + len(r.pattern) for r in ROUTES) + 3
    lines = [f"softlb {__version__} admin (docs/OPERATIONS.md); routes:", ""]
    lines += [f"  {(r.method + ' ' + r.pattern).ljust(width)}{r.help}" for r in ROUTES]
    return _text(200, "\n".join(lines))


async def h_healthz(app: Admin, req: Request, p: dict[str, str]) -> Response:
    return _text(200, "ok")


async def h_readyz(app: Admin, req: Request, p: dict[str, str]) -> Response:
    rt = app.rt
    if not rt.catalog_ready.is_set():
        return _text(503, "not ready: catalog not loaded")
    problem = rt.reload_problem()
    if problem:
        return _text(503, f"not ready: {problem}")
    return _text(200, "ready")


async def h_metrics(app: Admin, req: Request, p: dict[str, str]) -> Response:
    return Response(200, await metrics.render_stepped(app.registry), metrics.CONTENT_TYPE)


async def h_status(app: Admin, req: Request, p: dict[str, str]) -> Response:
    rt = app.rt
    code, services = await ask(rt, {"op": "services"}, req.source)
    if code != 200:
        return _json(code, services)
    problems = {}
    for s in services:
        if s["eligible"] < s["endpoints"] or s["panic"] or not s.get("served"):
            code, d = await ask(rt, {"op": "endpoints", "service": s["name"]}, req.source)
            if code == 200:
                problems[s["name"]] = _service_problem(d)
    return _json(200, status_document(rt, services, problems))


def _service_problem(d: dict[str, Any]) -> str:
    """The first reason endpoints of this service are not served, counted."""
    eps = d.get("endpoints", [])
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for e in eps:
        why = e.get("why") or {}
        if not e.get("served") and why.get("reason"):
            counts[why["reason"]] = counts.get(why["reason"], 0) + 1
            first.setdefault(why["reason"], why["detail"])
    served = sum(1 for e in eps if e.get("served"))
    if d.get("panic"):
        return f"panic: {sum(1 for e in eps if e.get('eligible'))} of {len(eps)} eligible"
    if not eps:
        return "no endpoints in the catalog"
    # A tag filter or locality leaving some endpoints out is the config working; it is a
    # problem only when nothing is left. Health reasons are always worth a line.
    health = [r for r in ("registry", "probe", "ejected") if r in counts]
    if served and not health:
        return ""
    top = health[0] if served else max(counts, key=lambda k: counts[k])
    msg = f"{counts[top]} not served: {first[top]}"
    return msg if served else f"NOTHING SERVED; {msg}"


def status_document(rt: Runtime, services: list[dict[str, Any]], problems: dict[str, str]) -> dict[str, Any]:
    s = rt.stats
    now = rt.now()
    last = s.last_reload
    cfg = rt.config
    confirmed = rt.source_confirmed_at
    ages = [now - b.fetched_at for b in rt.engine.services.values() if b.fetched_at is not None]
    source_age = (now - confirmed if cfg.source == "file" and confirmed is not None else
                  (max(ages) if ages and cfg.source != "file" else None))
    return {
        "version": __version__,
        "pid": os.getpid(),
        "started": s.started_wall,
        "uptime": round(now - s.started, 3),
        "ready": rt.catalog_ready.is_set() and not rt.reload_problem(),
        "problem": rt.reload_problem(),
        "source": {
            "kind": cfg.source,
            "status": rt.source_status,
            "up": rt.source_up(),
            "data_age": None if source_age is None else round(max(0.0, source_age), 3),
            "stale_services": sorted(n for n, b in rt.engine.services.items() if b.stale),
        },
        "last_reload": None if last is None else {"at": last[0], "what": last[1], "ok": not last[2],
                                                  "error": last[2] or None},
        "reloads": {"config_ok": s.config_reloads, "config_refused": s.config_reload_errors,
                    "catalog_ok": s.catalog_reloads, "catalog_refused": s.catalog_errors},
        "agent": {"node": cfg.node, "zone": cfg.zone, "region": cfg.region},
        "listeners": {"socket": cfg.socket or default_socket_path(), "listen": cfg.listen or None, "admin": cfg.admin or None},
        "clients_connected": s.connections_open,
        "errors": dict(sorted(s.errors.items())),
        "errors_recent": rt.recent_errors(),
        "services": [dict(sv, problem=problems.get(sv["name"], "")) for sv in services],
    }


def redacted_config(rt: Runtime) -> dict[str, Any]:
    d = asdict(rt.config)
    consul = d.get("consul") or {}
    if consul.get("token"):
        consul["token"] = "(redacted)"
    return d


async def h_config(app: Admin, req: Request, p: dict[str, str]) -> Response:
    rt = app.rt
    return _json(200, {"path": rt.config_path, "config": redacted_config(rt)})


async def h_services(app: Admin, req: Request, p: dict[str, str]) -> Response:
    rt = app.rt
    return await _asked(rt, {"op": "services"}, req.source)


async def h_service(app: Admin, req: Request, p: dict[str, str]) -> Response:
    rt = app.rt
    return await _asked(rt, {"op": "endpoints", "service": p["service"]}, req.source)


async def h_endpoint(app: Admin, req: Request, p: dict[str, str]) -> Response:
    rt = app.rt
    code, d = await ask(rt, {"op": "endpoints", "service": p["service"]}, req.source)
    if code != 200:
        return _json(code, d)
    for e in d["endpoints"]:
        if e["id"] == p["endpoint"]:
            return _json(200, dict(e, service=d["service"]))
    return _error(404, "UNKNOWN_ENDPOINT", f"service \"{p['service']}\" has no endpoint \"{p['endpoint'][:200]}\"")


async def h_resolve(app: Admin, req: Request, p: dict[str, str]) -> Response:
    rt = app.rt
    msg: dict[str, Any] = {"op": "resolve", "service": p["service"], "lease": _flag(req.arg("lease", "false") or "")}
    key = req.arg("key")
    if key is not None:
        msg["key"] = key
    tags = [v for k, v in req.query if k == "tag"]
    if tags:
        msg["tags"] = tags
    return await _asked(rt, msg, req.source)


async def h_report(app: Admin, req: Request, p: dict[str, str]) -> Response:
    rt = app.rt
    msg: dict[str, Any] = {"op": "report", "ok": _flag(req.arg("ok", "true") or "")}
    lease = req.arg("lease")
    if lease is not None:
        # isascii: str.isdigit() is true for "²", which int() refuses.
        if not (lease.isascii() and lease.isdigit() and len(lease) <= MAX_LEASE_DIGITS):
            return _error(400, "BAD_ARGUMENT", f"lease must be an integer of at most {MAX_LEASE_DIGITS} digits, "
                          f"got {lease[:40]!r}{'...' if len(lease) > 40 else ''}")
        msg["lease"] = int(lease)
    latency = req.arg("latency")
    if latency is not None:
        msg["latency"] = _number(latency)
    for k in ("service", "endpoint"):
        v = req.arg(k)
        if v is not None:
            msg[k] = v
    return await _asked(rt, msg, req.source)


ROUTES: list[Route] = [
    Route("GET", "/", h_index, "this index (?format=json for JSON)"),
    Route("GET", "/healthz", h_healthz, "200 while the agent answers (liveness)"),
    Route("GET", "/readyz", h_readyz, "200 once the catalog is loaded and the last reloads applied, else 503 and why"),
    Route("GET", "/metrics", h_metrics, "Prometheus metrics"),
    Route("GET", "/v1/status", h_status, "is this host's LB healthy: version, source, reloads, services, listeners"),
    Route("GET", "/v1/config", h_config, "the effective config with defaults (the Consul token redacted)"),
    Route("GET", "/v1/services", h_services, "the services table"),
    Route("GET", "/v1/services/{service}", h_service, "a service's endpoints, each with why it is (not) served"),
    Route("GET", "/v1/services/{service}/endpoints/{endpoint}", h_endpoint, "one endpoint's detail"),
    Route("GET", "/v1/resolve/{service}", h_resolve, "one pick (?key=K&tag=T&lease=1)"),
    Route("POST", "/v1/report", h_report, "an outcome (?lease=N&ok=false&latency=0.2, or service=&endpoint=)"),
]


def render_metrics(rt: Runtime) -> str:
    """The /metrics text for `rt` (tests, and tools without a socket)."""
    return metrics.render(Admin(rt).registry).decode()
