"""The HTTP face of the simulator: Consul's endpoints, blocking queries, ACLs and faults.

A stdlib ThreadingHTTPServer, so it runs the same way in-process (tests that poke the state
directly) and as a subprocess (tests that kill it). HTTP/1.1 keep-alive like Consul, so
clients pool connections and a blocking query holds one open, as it does in production.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .coordinates import sort_near
from .goparse import parse_go_bool, parse_go_duration
from .state import AGENT_NODE, CONTROL_METHODS, ConsulSim, Fault

_MAX_INDEX = (1 << 64) - 1
#: Consul's `lib.RandomStagger(wait / 16)`.
JITTER_FRACTION = 16


class BadRequest(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the client's delayed ACK adds
    # ~40 ms to every answer. Go (Consul) sets TCP_NODELAY by default too.
    disable_nagle_algorithm = True
    server: SimHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    # ------------------------------------------------------------------ plumbing

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _send(self, status: int, body: bytes | str = b"", *, ctype: str = "text/plain; charset=utf-8",
              headers: dict[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        with self.server.sim.cond:
            self.server.sim.bytes_out[self.path.split("?", 1)[0]] += len(data)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        sim = self.server.sim
        self.send_header("X-Consul-Default-Acl-Policy", "deny" if sim.acl_token else "allow")
        override = getattr(self, "header_override", None) or {}
        self.header_override = None
        low = {k.lower() for k in override}
        for k, v in (headers or {}).items():
            if k.lower() not in low:
                self.send_header(k, v)
        for k, v in override.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _json(self, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(obj), ctype="application/json", headers=headers)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = url.path
        query = parse_qs(url.query, keep_blank_values=True)
        sim = self.server.sim
        if path.startswith("/_sim/"):
            self._control(path[len("/_sim/"):], method)
            return
        body = self._body()
        with sim.cond:
            sim.counts[path] += 1
            sim.log.append((time.monotonic(), path, url.query))
            fault = sim.take_fault(path)
        if fault and not self._apply_fault(fault, path):
            return
        if path.startswith("/v1/") and not self._acl_ok(query):
            return
        try:
            self._route(method, path, query, body)
        except BadRequest as e:
            self._send(400, str(e))

    def _apply_fault(self, fault: Fault, path: str) -> bool:
        """True: go on and serve the request normally."""
        sim = self.server.sim
        if fault.mode == "drop":
            self._drop()
            return False
        if fault.mode == "500":
            self._send(500, "rpc error making call: No cluster leader")
            return False
        if fault.mode == "garbage":
            with sim.cond:
                index = sim.index
            self._send(200, fault.body, ctype="application/json",
                       headers={"X-Consul-Index": str(index)})
            return False
        if fault.mode == "429":
            # Consul's rate limiter (agent/http.go): 429, empty body.
            self._send(429, b"", headers={"Retry-After": fault.retry_after} if fault.retry_after else None)
            return False
        if fault.mode == "endless":
            self._endless()
            return False
        if fault.mode == "headers":
            self.header_override = fault.headers
            return True
        # stall: hold the request until the fault is cleared (then serve) or the server stops.
        with sim.cond:
            while fault in sim.faults and not sim.closing:
                sim.cond.wait(1.0)
            closing = sim.closing
        if closing:
            self._drop()
            return False
        return True

    def _endless(self) -> None:
        """200, a valid index, and a chunked JSON body that never ends (until the client
        hangs up or the server stops)."""
        sim = self.server.sim
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Consul-Index", str(sim.index))
        self.end_headers()
        chunk = b"[" + b'{"Node": {"Node": "x"}},' * 2000
        try:
            while not sim.closing:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                chunk = b'{"Node": {"Node": "x"}},' * 2000
        except OSError:
            pass
        self.close_connection = True

    def _acl_ok(self, query: dict[str, list[str]]) -> bool:
        """True: serve it. Sets self.acl_filtered for a valid token without read rights
        (and for no token: the anonymous token, which has none when ACLs default to deny)."""
        sim = self.server.sim
        self.acl_filtered = False
        if not sim.acl_token:
            return True
        token = (query.get("token") or [""])[0] or self.headers.get("X-Consul-Token") or ""
        auth = self.headers.get("Authorization") or ""
        if not token and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        if token == sim.acl_token:
            return True
        if token and token not in sim.acl_filtered_tokens:
            self._send(403, "ACL not found")
            return False
        if self.command == "GET":
            # agent/acl.go: reads are filtered to what the token may see, not refused.
            self.acl_filtered = True
            return True
        self._send(403, "Permission denied")
        return False

    def _control(self, name: str, method: str) -> None:
        if method != "POST" or name not in CONTROL_METHODS:
            self._send(404)
            return
        try:
            kwargs = json.loads(self._body() or b"{}")
            result = getattr(self.server.sim, name)(**kwargs)
        except Exception as e:  # the control API reports any failure to the test
            self._send(400, f"{type(e).__name__}: {e}")
            return
        self._json(result)

    # ------------------------------------------------------------------ routes

    def _route(self, method: str, path: str, q: dict[str, list[str]], body: bytes) -> None:
        reads = {"/v1/catalog/services", "/v1/agent/services", "/v1/agent/checks"}
        health_state = path.startswith("/v1/health/state/")
        if path.startswith("/v1/health/service/") or path in reads or health_state:
            dc = (q.get("dc") or [""])[0]
            if method != "GET":
                self._send(405, f"method {method} not allowed", headers={"Allow": "GET"})
            elif dc and dc != self.server.sim.datacenter:
                # agent/consul/rpc.go forwardDC: an unknown datacenter
                self._send(500, "No path to datacenter")
            elif path.startswith("/v1/health/service/"):
                self._health_service(unquote(path[len("/v1/health/service/"):]), q)
            elif health_state:
                state = path[len("/v1/health/state/"):]
                if state not in ("any", "passing", "warning", "critical"):
                    raise BadRequest("Invalid check state")
                filt = parse_filter((q.get("filter") or [""])[0]) if "filter" in q else None
                self._blocking(q, lambda s: s.checks_index,
                               lambda s: [c for c in s.checks_in_state(state) if filt is None or filt(c)],
                               empty=[])
            elif path == "/v1/catalog/services":
                self._blocking(q, lambda s: s.catalog_index, lambda s: s.catalog_services(), empty={})
            elif path == "/v1/agent/services":
                self._json(self.server.sim.agent_services())
            else:
                self._json(self.server.sim.agent_checks())
            return
        writes = ("/v1/agent/service/register", "/v1/agent/service/deregister/",
                  "/v1/agent/check/", "/v1/agent/service/maintenance/")
        if path.startswith(writes):
            if method != "PUT":
                self._send(405, f"method {method} not allowed", headers={"Allow": "PUT"})
            elif path == "/v1/agent/service/register":
                self._register(q, body)
            elif path.startswith("/v1/agent/service/deregister/"):
                sid = unquote(path.rsplit("/", 1)[1])
                if self.server.sim.deregister(sid):
                    self._send(200)
                else:
                    self._send(404, f'Unknown service ID "{sid}". Ensure that the service ID is '
                                    "passed, not the service name.")
            elif path.startswith("/v1/agent/check/"):
                self._ttl(path, q)
            else:
                self._maintenance(unquote(path.rsplit("/", 1)[1]), q)
            return
        if path == "/":
            self._send(200, "Consul Agent")
            return
        self._send(404)

    def _consistency(self, q: dict[str, list[str]]) -> str:
        if "stale" in q and "consistent" in q:
            raise BadRequest("Cannot specify ?stale with ?consistent, conflicting semantics.")
        return "stale" if "stale" in q else "consistent" if "consistent" in q else "leader"

    def _blocking(self, q: dict[str, list[str]], index_of: Any, result_of: Any, *, empty: Any = None,
                  streams: bool = False) -> None:
        """Consul's blocking-query loop (agent/blockingquery), the streaming backend and the
        agent cache: see docs/CONSUL_TESTSERVER.md."""
        sim = self.server.sim
        wait_s = (q.get("wait") or [""])[0]
        index_s = (q.get("index") or [""])[0]
        try:
            wait = parse_go_duration(wait_s) if wait_s else 0.0
        except ValueError:
            raise BadRequest("Invalid wait time") from None
        if index_s and (not index_s.isdigit() or int(index_s) > _MAX_INDEX):
            raise BadRequest("Invalid index")
        min_index = int(index_s) if index_s else 0
        consistency = self._consistency(q)
        if wait == 0:
            wait = sim.default_query_time
        wait = min(wait, sim.max_query_time)
        # agent/health_endpoint.go: useStreaming = use_streaming_backend && index > 0 && no
        # ?near; streaming and ?cached answer through the agent cache.
        streaming = streams and sim.backend == "streaming" and min_index > 0 and "near" not in q
        cached = "cached" in q or streaming
        key = self.path.split("?")[0] + "?" + "&".join(
            f"{k}={v}" for k, vs in sorted(q.items()) if k not in ("index", "wait") for v in vs)
        with sim.cond:
            lost_at = sim.servers_lost_at
            if lost_at is not None:
                hit = sim.cache.get(key) if cached else None
                if hit is None:
                    closing = sim.closing
                    lost = True
                else:
                    lost = False
            else:
                lost = False
        if lost:
            if closing:
                self._drop()
            else:
                self._send(500, "rpc error making call: No known Consul servers")
            return
        if lost_at is not None:
            value, index = hit  # type: ignore[misc]
            headers = {"X-Consul-Index": str(max(1, index)), "X-Cache": "HIT",
                       "Age": str(int(time.monotonic() - lost_at)),
                       "X-Consul-Query-Backend": "streaming" if streaming else "blocking-query",
                       # the cached result's own meta, from when the servers still answered
                       "X-Consul-Knownleader": "true", "X-Consul-Lastcontact": "0"}
            if min_index > 0 and index <= min_index:
                time.sleep(min(wait, 0.5))  # nothing new can come: block a little, like a wait
            self._json(value, headers)
            return
        with sim.cond:
            if min_index > 0:
                wait += sim.rng.uniform(0, wait / JITTER_FRACTION)
                deadline = time.monotonic() + wait
                epoch = sim.epoch
                while (index_of(sim) <= min_index and sim.epoch == epoch and not sim.closing):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    sim.cond.wait(remaining)
            if sim.closing:
                closing = True
            else:
                closing = False
                filtered = getattr(self, "acl_filtered", False)
                result = empty if filtered else result_of(sim)
                index = max(1, index_of(sim))
                headers = {"X-Consul-Index": str(index),
                           "X-Consul-Effective-Consistency": consistency,
                           "X-Consul-Query-Backend": "streaming" if streaming else "blocking-query",
                           # agent/http.go setMeta writes the materialized view's unset
                           # QueryMeta: KnownLeader false, LastContact 0 (upstream #9776).
                           "X-Consul-Knownleader": "false" if streaming else
                           "true" if sim.known_leader else "false",
                           "X-Consul-Lastcontact": "0" if streaming else str(sim.last_contact_ms)}
                if filtered:
                    headers["X-Consul-Results-Filtered-By-Acls"] = "true"
                if cached:
                    hit = key in sim.cache
                    sim.cache[key] = (result, index)
                    # agent/http.go setCacheMeta: X-Cache, and Age on a hit (0: fresh).
                    headers["X-Cache"] = "HIT" if hit else "MISS"
                    if hit:
                        headers["Age"] = "0"
        if closing:
            self._drop()
            return
        self._json(result, headers)

    def _health_service(self, name: str, q: dict[str, list[str]]) -> None:
        if not name:
            raise BadRequest("Missing service name")
        passing = False
        if "passing" in q:
            v = q["passing"][0]
            try:
                passing = v == "" or parse_go_bool(v)
            except ValueError:
                raise BadRequest("Invalid value for ?passing") from None
        filt = parse_filter((q.get("filter") or [""])[0]) if "filter" in q else None
        node_meta = {}
        for nm in q.get("node-meta", []):
            k, sep, v = nm.partition(":")
            if not sep:
                raise BadRequest(f"Invalid node-meta filter {nm!r}")
            node_meta[k] = v
        tags = q.get("tag", [])
        near = (q.get("near") or [""])[0]

        def result(sim: ConsulSim) -> list[Any]:
            entries = sim.health_entries(name, tags, passing, node_meta)
            if filt is not None:
                entries = [e for e in entries if filt(e)]
            if near:
                # agent/http.go parseSource; agent/consul/rtt.go (see coordinates.py)
                return sort_near(entries, AGENT_NODE if near == "_agent" else near, sim.coords)
            return entries

        self._blocking(q, lambda s: s.health_index(name), result, empty=[], streams=True)

    def _register(self, q: dict[str, list[str]], body: bytes) -> None:
        try:
            raw = json.loads(body or b"null")
        except ValueError as e:
            raise BadRequest(f"Request decode failed: {e}") from None
        if not isinstance(raw, dict):
            raise BadRequest("Request decode failed: expected an object")
        svc, checks = normalise_registration(raw)
        replace = "replace-existing-checks" in q
        self.server.sim.register(svc, checks, replace)
        self._send(200)

    def _ttl(self, path: str, q: dict[str, list[str]]) -> None:
        parts = path.split("/", 5)  # ['', 'v1', 'agent', 'check', verb, id]
        if len(parts) < 6 or parts[4] not in ("pass", "warn", "fail"):
            self._send(404)
            return
        verb, cid = parts[4], unquote(parts[5])
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}[verb]
        note = (q.get("note") or [""])[0]
        found = self.server.sim.update_ttl(cid, status, note)
        if found is None:
            # agent/acl.go vetCheckUpdateWithAuthorizer, before the TTL lookup (current Consul)
            self._send(404, f'Unknown check ID "{cid}". Ensure that the check ID is passed, '
                            "not the check name.")
        elif found:
            self._send(200)
        else:
            self._send(500, f'CheckID "{cid}" does not have associated TTL')

    def _maintenance(self, sid: str, q: dict[str, list[str]]) -> None:
        if "enable" not in q or not q["enable"][0]:
            raise BadRequest("Missing value for enable")
        try:
            enable = parse_go_bool(q["enable"][0])
        except ValueError:
            raise BadRequest("Invalid value for enable") from None
        reason = (q.get("reason") or [""])[0]
        if not self.server.sim.maintenance(sid, enable, reason):
            self._send(404, f'Unknown service ID "{sid}"')
            return
        self._send(200)


# --------------------------------------------------------------------------- ?filter


_CLAUSE = re.compile(r'\s*(?:"([^"]*)"\s+in\s+([\w.-]+)|([\w.-]+)\s*(==|!=|matches)\s*"([^"]*)")\s*\Z')


def _select(entry: Any, selector: str) -> Any:
    v = entry
    for part in selector.split("."):
        if not isinstance(v, dict):
            return None
        v = v.get(part)
    return v


def parse_filter(expr: str) -> Any:
    """A subset of Consul's bexpr filters (go-bexpr): clauses `"v" in Sel`, `Sel == "v"`,
    `Sel != "v"`, `Sel matches "regexp"` (a search, as Go's MatchString), joined by `and`,
    alternatives joined by `or` (`and` binds tighter); a selector is a dotted path
    (`Service.Tags`, `Node.Meta.zone`, `ServiceName`). Anything else is a 400, as a filter
    Consul cannot parse is."""
    alternatives = []
    for alt in re.split(r"\bor\b", expr):
        preds = []
        for part in re.split(r"\band\b", alt):
            m = _CLAUSE.match(part)
            if not m:
                raise BadRequest(f"Failed to create boolean expression evaluator: consulsim does not "
                                 f"model {part.strip()!r}")
            if m.group(1) is not None:
                preds.append(lambda e, v=m.group(1), sel=m.group(2): v in (_select(e, sel) or []))
            else:
                sel, op, v = m.group(3), m.group(4), m.group(5)
                literal = re.fullmatch(r"\^\(([\w.\[\]|-]+)\)\$", v) if op == "matches" else None
                if literal:
                    # ^(a|b[.]c)$, the feed's filter: a set lookup. Python's backtracking re
                    # would try a thousand alternatives per check; Go's RE2 (Consul) does not.
                    names = frozenset(n.replace("[.]", ".") for n in literal.group(1).split("|"))
                    preds.append(lambda e, sel=sel, names=names: _select(e, sel) in names)
                elif op == "matches":
                    try:
                        rx = re.compile(v)
                    except re.error as err:
                        raise BadRequest(f"Failed to create boolean expression evaluator: {err}") from None
                    preds.append(lambda e, sel=sel, rx=rx: isinstance(_select(e, sel), str)
                                 and rx.search(_select(e, sel)) is not None)
                elif op == "==":
                    preds.append(lambda e, sel=sel, v=v: (_select(e, sel) or "") == v)
                else:
                    preds.append(lambda e, sel=sel, v=v: (_select(e, sel) or "") != v)
        alternatives.append(preds)
    return lambda e: any(all(p(e) for p in preds) for preds in alternatives)


# --------------------------------------------------------------------------- registration


def _norm(d: Any, where: str) -> dict[str, Any]:
    """Consul accepts PascalCase, camelCase and snake_case keys for agent registrations."""
    if not isinstance(d, dict):
        raise BadRequest(f"Request decode failed: {where}: expected an object")
    return {k.lower().replace("_", ""): v for k, v in d.items()}


def _dur(c: dict[str, Any], key: str, default: float) -> float:
    v = c.get(key)
    if v in (None, ""):
        return default
    try:
        return parse_go_duration(v) if isinstance(v, str) else float(v) / 1e9  # Go: int = ns
    except (ValueError, TypeError):
        raise BadRequest(f"Request decode failed: invalid duration for {key}: {v!r}") from None


def normalise_registration(raw: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    s = _norm(raw, "service")
    name = s.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("Missing service name")
    sid = s.get("id") or name
    port = s.get("port") or 0
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise BadRequest("Invalid service port")
    weights = _norm(s.get("weights") or {}, "Weights")
    tagged = {}
    for kind, v in (s.get("taggedaddresses") or {}).items():
        v = _norm(v, f"TaggedAddresses.{kind}")
        tagged[kind] = {"Address": v.get("address", ""), "Port": v.get("port", 0)}
    svc = {"id": sid, "name": name, "address": s.get("address") or "", "port": port,
           "tags": list(s.get("tags") or []), "meta": dict(s.get("meta") or {}),
           "weights": {"Passing": int(weights.get("passing", 1)), "Warning": int(weights.get("warning", 1))},
           "tagged": tagged}
    raw_checks = list(s.get("checks") or [])
    if s.get("check"):
        raw_checks.insert(0, s["check"])
    checks = []
    for i, rc in enumerate(raw_checks):
        c = _norm(rc, f"Checks[{i}]")
        cid = c.get("checkid") or c.get("id") or (
            f"service:{sid}" if len(raw_checks) == 1 else f"service:{sid}:{i + 1}")
        kind, target = "external", ""
        if c.get("ttl"):
            kind = "ttl"
        elif c.get("http"):
            kind, target = "http", c["http"]
        elif c.get("tcp"):
            kind, target = "tcp", c["tcp"]
        else:
            raise BadRequest("Check is not valid: one of TTL, HTTP or TCP is required by consulsim")
        interval = _dur(c, "interval", 0.0)
        if kind in ("http", "tcp") and interval <= 0:
            raise BadRequest("Interval must be > 0 for Script, HTTP, H2PING, or TCP checks")
        status = c.get("status") or "critical"
        if status not in ("passing", "warning", "critical"):
            raise BadRequest(f"Invalid initial status {status!r}")
        checks.append({"checkid": cid, "name": c.get("name") or f"Service '{name}' check",
                       "status": status, "notes": c.get("notes") or "", "kind": kind,
                       "ttl": _dur(c, "ttl", 0.0), "interval": interval,
                       "timeout": _dur(c, "timeout", 10.0), "target": target,
                       "method": c.get("method") or "GET"})
    return svc, checks


# --------------------------------------------------------------------------- the server


class SimHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], sim: ConsulSim) -> None:
        self.sim = sim
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def drop_all_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Checker(threading.Thread):
    """Runs TTL expiry and the HTTP/TCP checks of registered services, like a Consul agent."""

    def __init__(self, sim: ConsulSim, stop: threading.Event) -> None:
        super().__init__(daemon=True, name="consulsim-checks")
        self.sim, self.stop = sim, stop

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for c in self.sim.due_checks(time.monotonic()):
                status, output = probe(c.kind, c.target, c.method, min(c.timeout, 2.0))
                self.sim.probe_result(c, status, output)


def probe(kind: str, target: str, method: str, timeout: float) -> tuple[str, str]:
    try:
        if kind == "tcp":
            host, _, port = target.rpartition(":")
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return "passing", f"TCP connect {target}: Success"
        req = urllib.request.Request(target, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                code = r.status
        except urllib.error.HTTPError as e:
            code = e.code
        status = "passing" if 200 <= code < 300 else "warning" if code == 429 else "critical"
        return status, f"HTTP {method} {target}: {code}"
    except (OSError, ValueError, http.client.HTTPException) as e:
        return "critical", f"{kind} check {target}: {e}"


class SimServer:
    """An in-process Consul API server on 127.0.0.1 (port 0: pick a free one)."""

    def __init__(self, sim: ConsulSim | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sim = sim or ConsulSim()
        self.httpd = SimHTTPServer((host, port), self.sim)
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                          daemon=True, name="consulsim-http"),
                         _Checker(self.sim, self._stop)]

    def start(self) -> SimServer:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Like a killed Consul: the port closes and every open connection is reset."""
        self._stop.set()
        self.sim.close()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd.drop_all_connections()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
