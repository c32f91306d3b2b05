"""The Engine: the whole sans-I/O load balancer the agent drives.

The agent's tasks feed it events (a catalog update, a probe result, a client's report, a
config reload, a timer firing) and act on what comes back (frames to send, the next deadline,
which services changed). It never blocks, never reads a clock, never does I/O; everything
that happens to it arrives as a method call carrying `now`.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from . import _protocol as P
from ._balancer import ServiceBalancer
from ._config import AgentConfig
from ._errors import ErrorCode, RemoteProtocolError, RequestError
from ._leases import LeaseTable
from ._locality import Locality
from ._types import Endpoint
from ._wire import PROTOCOL_VERSIONS

AGENT_NAME = "softlb/0.1.0"
#: Ops the engine answers itself; `watch`/`unwatch` stream, so the agent's connection owns them.
ENGINE_OPS = ("hello", "resolve", "report", "services", "endpoints")
STREAM_OPS = ("watch", "unwatch")


@dataclass(frozen=True, slots=True)
class Resolution:
    endpoint: Endpoint
    lease: int | None
    panic: bool
    stale: bool
    age: float | None


class Engine:
    def __init__(self, config: AgentConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.services: dict[str, ServiceBalancer] = {}
        self.leases = LeaseTable(config.lease_ttl)
        #: Open `watch` streams per service (kept by the agent's connections): a watched
        #: service is in use even when nobody resolves it, so sources must not idle it out.
        self.watchers: collections.Counter[str] = collections.Counter()
        #: Called with a service name whenever what `watch` shows for it changes.
        self.on_change: Callable[[str], None] | None = None
        #: Asked when a resolve names a service the engine does not know; returning True
        #: means "a source is fetching it" and the agent retries after waiting (Consul
        #: on-demand watches). The file source leaves it unset.
        self.on_unknown_service: Callable[[str], bool] | None = None
        #: Request errors answered (by code), and resolves of services nobody knows (no
        #: per-name count: callers choose names, so a label per name would be unbounded).
        self.errors: collections.Counter[str] = collections.Counter()
        self.unknown_service_resolves = 0
        #: service -> `now` of its latest resolve; on-demand catalog sources (Consul) read
        #: it to expire services nobody uses, without a callback on every resolve.
        self.last_resolved: dict[str, float] = {}

    # ----------------------------------------------------------------- catalog input

    def _balancer(self, name: str) -> ServiceBalancer:
        b = self.services.get(name)
        if b is None:
            b = self.services[name] = ServiceBalancer(name, self.config.service(name), self.rng, self._here())
        return b

    def _here(self) -> Locality:
        return Locality(self.config.node, self.config.zone, self.config.region)

    def _changed(self, name: str) -> None:
        if self.on_change is not None:
            self.on_change(name)

    def set_service(
        self, name: str, endpoints: Sequence[Endpoint], now: float, *, stale: bool = False, fetched_at: float | None = None
    ) -> bool:
        new = name not in self.services
        b = self._balancer(name)
        # A service appearing is a change even with no endpoints: whoever waits for its
        # first answer (an on-demand resolve, a watch) must hear "empty" now, not time out.
        changed = b.set_endpoints(endpoints, now) or new
        changed |= b.set_freshness(stale, now if fetched_at is None else fetched_at)
        if changed:
            self._changed(name)
        return changed

    def remove_service(self, name: str, now: float) -> None:
        self.last_resolved.pop(name, None)
        if self.services.pop(name, None) is not None:
            self.leases.drop_service(name)
            self._changed(name)

    def replace_all(self, services: Mapping[str, Sequence[Endpoint]], now: float) -> list[str]:
        """Make the catalog exactly `services` (the file source). Returns the changed names."""
        changed = [n for n in list(self.services) if n not in services]
        for name in changed:
            self.remove_service(name, now)
        for name, eps in services.items():
            if self.set_service(name, eps, now):
                changed.append(name)
        return changed

    def reconfigure(self, config: AgentConfig, now: float) -> None:
        """Apply a reloaded config; services whose settings changed get a new balancer that
        adopts the old one's endpoints, so answers continue without a gap."""
        old = self.config
        self.config = config
        self.leases.ttl = config.lease_ttl
        moved = (old.node, old.zone, old.region) != (config.node, config.zone, config.region)
        for name, b in list(self.services.items()):
            if moved or old.service(name) != config.service(name):
                nb = ServiceBalancer(name, config.service(name), self.rng, self._here())
                nb.adopt(b, now)
                self.services[name] = nb
                self._changed(name)

    # ----------------------------------------------------------------- requests

    def resolve(
        self,
        service: str,
        now: float,
        key: str | None = None,
        tags: tuple[str, ...] = (),
        source: str | None = None,
        lease: bool = True,
    ) -> Resolution:
        b = self.services.get(service)
        if b is None:
            self.unknown_service_resolves += 1
            raise RequestError(ErrorCode.UNKNOWN_SERVICE, f"unknown service \"{service}\"")
        deadline = b.next_deadline()
        if deadline is not None and now >= deadline:
            # An ejection ran out since the last tick: return the endpoint before picking.
            self._tick_service(b, now)
        self.last_resolved[service] = now
        ep = b.pick(key, source, tags, now)
        if ep is None:
            b.counters.no_healthy += 1
            raise RequestError(ErrorCode.NO_HEALTHY_ENDPOINT, self._why_empty(b, tags, now))
        c = b.counters
        c.resolved += 1
        ec = c.endpoints.get(ep.id)
        if ec is None:
            ec = c.endpoint(ep.id)
        ec.picks += 1
        lease_id = None
        if lease:
            le, evicted = self.leases.open(service, ep.id, now)
            lease_id = le.id
            b.on_start(ep.id, now)
            self._finish_leases(evicted, now)
        age = None if b.fetched_at is None or not b.stale else max(0.0, now - b.fetched_at)
        return Resolution(ep, lease_id, b.panic, b.stale, age)

    def _why_empty(self, b: ServiceBalancer, tags: tuple[str, ...], now: float) -> str:
        return b.why_empty(now, tags)

    def report(
        self,
        now: float,
        ok: bool,
        latency: float | None = None,
        lease: int | None = None,
        service: str | None = None,
        endpoint_id: str | None = None,
    ) -> None:
        """A caller's outcome for a pick: by lease (closes it) or by service + endpoint id."""
        if lease is not None:
            le = self.leases.close(lease)
            if le is None:
                raise RequestError(ErrorCode.UNKNOWN_LEASE, f"lease {lease} is unknown or expired")
            service, endpoint_id = le.service, le.endpoint_id
            if latency is None:
                latency = max(0.0, now - le.started)
            b = self.services.get(service)
            if b is not None:
                if endpoint_id in b.by_id:  # not one that left the catalog meanwhile
                    b.counters.report(endpoint_id, ok, latency)
                b.on_finish(endpoint_id, ok, latency, now)
                if b.record_outcome(endpoint_id, ok, now):
                    self._changed(b.name)
            return
        if service is None or endpoint_id is None:
            raise RequestError(ErrorCode.BAD_ARGUMENT, "report needs \"lease\", or \"service\" and \"endpoint\"")
        b = self.services.get(service)
        if b is None:
            raise RequestError(ErrorCode.UNKNOWN_SERVICE, f"unknown service \"{service}\"")
        if endpoint_id not in b.by_id:
            raise RequestError(ErrorCode.BAD_ARGUMENT, f"service \"{service}\" has no endpoint \"{endpoint_id}\"")
        b.counters.report(endpoint_id, ok, latency)
        self._feedback(b, endpoint_id, ok, latency, now)
        if b.record_outcome(endpoint_id, ok, now):
            self._changed(service)

    def probe_result(self, service: str, endpoint_id: str, ok: bool, now: float, detail: str = "") -> None:
        """An active probe's verdict. Results for services or endpoints that are gone (the
        catalog moved on while the probe ran) are ignored."""
        b = self.services.get(service)
        if b is not None and b.probe_result(endpoint_id, ok, now, detail):
            self._changed(service)

    def _feedback(self, b: ServiceBalancer, endpoint_id: str, ok: bool, latency: float | None, now: float) -> None:
        """An outcome without an open lease: tell the policy a request started and ended."""
        b.on_start(endpoint_id, now)
        b.on_finish(endpoint_id, ok, latency, now)

    def _finish_leases(self, leases: list[Any], now: float) -> None:
        # An expired or evicted lease ends with no verdict: the request count drops, but
        # no success or failure is invented for it.
        for le in leases:
            b = self.services.get(le.service)
            if b is not None:
                b.on_finish(le.endpoint_id, True, None, now)

    def tick(self, now: float) -> float | None:
        """Run timers due at `now` (lease expiry, ejection expiry); return when to call
        again (None: nothing scheduled)."""
        self._finish_leases(self.leases.expire(now), now)
        deadlines = [self.leases.next_deadline()]
        for b in self.services.values():
            deadline = b.next_deadline()
            if deadline is not None and now >= deadline:
                deadline = self._tick_service(b, now)
            deadlines.append(deadline)
        return min((d for d in deadlines if d is not None), default=None)

    def _tick_service(self, b: ServiceBalancer, now: float) -> float | None:
        if b.tick(now):
            self._changed(b.name)
        return b.next_deadline()

    # ----------------------------------------------------------------- the protocol

    def handle(self, msg: Any, now: float, source: str | None = None) -> bytes | None:
        """Answer one decoded request with a frame; None for ops the caller must handle
        (the streaming ops, and resolves of services a source is still fetching)."""
        try:
            rid, op = P.check_request(msg)
        except RemoteProtocolError as e:
            return P.error_frame(e.request_id if e.request_id is not None else P.request_id(msg), e.code, e.message)
        try:
            if op == "resolve":
                return self._op_resolve(rid, msg, now, source)
            if op == "report":
                self.report(
                    now,
                    ok=P.arg_bool(msg, "ok", True),
                    latency=P.arg_number(msg, "latency"),
                    lease=self._arg_lease(msg),
                    service=msg.get("service") if isinstance(msg.get("service"), str) else None,
                    endpoint_id=msg.get("endpoint") if isinstance(msg.get("endpoint"), str) else None,
                )
                return P.ok_frame(rid, {})
            if op == "services":
                return P.ok_frame(rid, [self.services[n].summary() for n in sorted(self.services)])
            if op == "endpoints":
                name = P.arg_service(msg)
                b = self.services.get(name)
                if b is None:
                    raise RequestError(ErrorCode.UNKNOWN_SERVICE, f"unknown service \"{name}\"")
                return P.ok_frame(rid, b.describe(now))
            if op == "hello":
                return P.ok_frame(rid, self.hello(P.arg_versions(msg)))
            if op in STREAM_OPS:
                return None
            return P.error_frame(rid, ErrorCode.UNKNOWN_OP, f"unknown op \"{op[:64]}\" (known: {', '.join(ENGINE_OPS + STREAM_OPS)})")
        except RequestError as e:
            self.errors[e.code.value] += 1
            return P.error_frame(rid, e.code, e.message)

    def _op_resolve(self, rid: Any, msg: dict[str, Any], now: float, source: str | None) -> bytes | None:
        service = P.arg_service(msg)
        b = self.services.get(service)
        if b is None and self.on_unknown_service is not None and self.on_unknown_service(service):
            return None
        r = self.resolve(
            service, now, key=P.arg_key(msg), tags=P.arg_tags(msg), source=source, lease=P.arg_bool(msg, "lease", True)
        )
        packed = self.services[service].packed[r.endpoint.id]
        return P.resolve_frame(rid, packed, r.lease, r.panic, r.stale, r.age)

    @staticmethod
    def _arg_lease(msg: dict[str, Any]) -> int | None:
        v = msg.get("lease")
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise RequestError(ErrorCode.BAD_ARGUMENT, "\"lease\" must be an integer")
        return v

    def hello(self, versions: Sequence[int]) -> dict[str, Any]:
        common = sorted(set(versions) & set(PROTOCOL_VERSIONS))
        if not common:
            raise RequestError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"no common protocol version: client offers {list(versions)}, agent speaks {list(PROTOCOL_VERSIONS)}",
            )
        return {
            "version": common[-1],
            "agent": AGENT_NAME,
            "ops": list(ENGINE_OPS + STREAM_OPS),
            "max_frame": self.config.max_frame,
        }
