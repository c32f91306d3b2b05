"""The Engine: the whole sans-I/O load balancer, behind one typed API every front end shares.

Front ends (the socket protocol, the admin HTTP API, the loopback proxy, DNS) call:

- `pick(service, now, key=, tags=, source=, scope=)` -> `Pick`, or `Pending(service)` when a
  catalog source fetches services on demand and has not got this one yet (the front end
  awaits that in one shared place, then picks again), or raises `RequestError` with a
  stable `ErrorCode` (UNKNOWN_SERVICE, NO_HEALTHY_ENDPOINT...).
- `finish(lease, now, ok=, latency=)` / `release(lease, now)`: a lease ends with or without
  a verdict. `report(...)`: a verdict naming the endpoint instead of a lease.
- views: `services_summary()`, `describe(service, now)`, `hello(versions)`.

Sources and timers feed it: `set_service`, `remove_service`, `replace_all`, `reconfigure`,
`probe_result`, `tick`. Every input returns what it changed, as a value (`Changes`: the
names of services whose watched state moved); the agent's one dispatcher fans that out to
watchers, the prober, logs and metrics. Nothing here calls back into the shell, blocks,
reads a clock or does I/O: everything that happens arrives as a method call carrying `now`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

from ._balancer import ServiceBalancer
from .policies._consistent import TableBuild
from ._config import AgentConfig
from ._errors import ErrorCode, RequestError
from ._leases import Lease, LeaseScope, LeaseTable
from ._locality import Locality
from ._protocol import ENDPOINT_FIELDS, pack_endpoint_fields
from ._set_build import EndpointSetBuild
from ._types import Endpoint
from ._vip import VipTable, parse_pool, parse_vip
from ._wire import PROTOCOL_VERSIONS

AGENT_NAME = "softlb/0.1.0"
#: Every op of protocol v1; `watch`/`unwatch` stream, so the front end's connection owns them.
OPS = ("hello", "resolve", "report", "services", "endpoints", "watch", "unwatch")

#: What a pick or a report raises: a request that cannot be answered, with its stable code.
PickError = RequestError

#: With deferred builds, a service given at least this many endpoints may be applied in
#: steps (`begin_set_service`); smaller ones cost less in line than a turn of the loop.
SET_STEP_MIN = 1000

#: Names of services whose watched state changed.
Changes = frozenset[str]
NO_CHANGES: Changes = frozenset()


class Pick(NamedTuple):
    """One pick (a NamedTuple: immutable, and cheap to build once per request)."""

    endpoint: Endpoint
    lease: int | None
    panic: bool
    stale: bool
    age: float | None
    #: The endpoint's constant resolve-answer fields, packed once per catalog change (the
    #: socket protocol splices them into its answer).
    wire: bytes = b""

    def as_dict(self) -> dict[str, Any]:
        """The resolve result as the protocol documents it."""
        ep = self.endpoint
        d: dict[str, Any] = {k: getattr(ep, k) for k in ENDPOINT_FIELDS}
        d.update(tags=list(ep.tags), meta=dict(ep.meta), lease=self.lease, panic=self.panic, stale=self.stale)
        if self.age is not None:
            d["age"] = round(self.age, 3)
        return d


@dataclass(frozen=True, slots=True)
class Pending:
    """The service is not known yet, but an on-demand source may have it: ask the source to
    fetch it, wait (bounded) for the change that adds it, and pick again."""

    service: str


class Engine:
    def __init__(self, config: AgentConfig, rng: random.Random, *, on_demand: bool = False,
                 defer_builds: bool = False) -> None:
        self.config = config
        #: With defer_builds, consistent-hash table rebuilds are left here for the caller to
        #: run in steps (`take_builds`); the old table serves meanwhile (policies/_consistent).
        self.table_builds: list[TableBuild] | None = [] if defer_builds else None
        #: The unfinished stepped update of each service (`begin_set_service`); any other
        #: update of the service supersedes it (it is dropped from here).
        self.set_builds: dict[str, EndpointSetBuild] = {}
        self.rng = rng
        #: Whether an unknown service may still exist at the source (Consul: fetched on the
        #: first pick). Without it, an unknown name is UNKNOWN_SERVICE at once.
        self.on_demand = on_demand
        self.services: dict[str, ServiceBalancer] = {}
        self.leases = LeaseTable(config.lease_ttl)
        #: service -> `now` of its latest pick (or of `mark_used`); on-demand sources read it
        #: to expire services nobody uses, without a callback on every pick.
        self.last_used: dict[str, float] = {}
        #: Resolves of services nobody knows: one count, no per-name label (callers choose
        #: names, so a label per name would be unbounded). Per-service answers are counted in
        #: each balancer's `counters` (softlb/_counters.py), read at scrape time.
        self.unknown_service_picks = 0
        # Changes made outside an input method's return (a pick running an ejection timer
        # that fell due before the ticker woke): handed out by the next `take_changes`.
        self._deferred: set[str] = set()
        #: Service addresses (softlb/_vip.py): explicit ones from the config, pool ones
        #: handed out as services appear.
        self.vips = _vip_table(config)

    def take_builds(self) -> list[TableBuild]:
        """Table rebuilds left since the last call, the superseded ones dropped: run each
        one's `steps()` (yielding between them, or whole in a worker thread), then
        `install()` it. Empty unless the engine was made with defer_builds."""
        if not self.table_builds:
            return []
        jobs = [j for j in self.table_builds if j.current]
        self.table_builds.clear()
        return jobs

    # ----------------------------------------------------------------- catalog input

    def _balancer(self, name: str) -> ServiceBalancer:
        b = self.services.get(name)
        if b is None:
            b = self.services[name] = ServiceBalancer(name, self.config.service(name), self.rng, self._here(), self.table_builds)
            self.vips.assign((name,))
            b.set_vip(self.vips.get(name))
        return b

    def _here(self) -> Locality:
        return Locality(self.config.node, self.config.zone, self.config.region)

    def begin_set_service(
        self, name: str, endpoints: Sequence[Endpoint], now: float, *, stale: bool = False, fetched_at: float | None = None
    ) -> EndpointSetBuild | Changes:
        """`set_service`, or, for a big set on an engine made with defer_builds, a build for
        the caller to run (`step(budget)` until it returns True, yielding between steps), then
        `install_set`. The current set serves until then (softlb/_set_build.py)."""
        b = self.services.get(name)
        if self.table_builds is None or len(endpoints) < SET_STEP_MIN or (b is not None and b.slow_start is not None):
            return self.set_service(name, endpoints, now, stale=stale, fetched_at=fetched_at)
        if b is None:  # a new service appears when its first set is installed
            b = ServiceBalancer(name, self.config.service(name), self.rng, self._here(), self.table_builds)
            if b.slow_start is not None:
                return self.set_service(name, endpoints, now, stale=stale, fetched_at=fetched_at)
        self._supersede(name)
        build = self.set_builds[name] = EndpointSetBuild(name, b, endpoints, stale=stale, fetched_at=fetched_at)
        return build

    def _supersede(self, name: str) -> None:
        build = self.set_builds.pop(name, None)
        if build is not None:
            build.current = False

    def install_set(self, build: EndpointSetBuild, now: float) -> Changes:
        """Swap in a finished build; NO_CHANGES if a newer update superseded it."""
        if not build.done or self.set_builds.get(build.name) is not build:
            return NO_CHANGES
        del self.set_builds[build.name]
        name, b = build.name, build.balancer
        new = name not in self.services
        if new:
            self.services[name] = b
            self.vips.assign((name,))
            b.set_vip(self.vips.get(name))
        changed = b.install_build(build, now) or new
        changed |= b.set_freshness(build.stale, now if build.fetched_at is None else build.fetched_at)
        return frozenset((name,)) if changed else NO_CHANGES

    def set_service(
        self, name: str, endpoints: Sequence[Endpoint], now: float, *, stale: bool = False, fetched_at: float | None = None
    ) -> Changes:
        self._supersede(name)
        new = name not in self.services
        b = self._balancer(name)
        # A service appearing is a change even with no endpoints: whoever waits for its
        # first answer (an on-demand pick, a watch) must hear "empty" now, not time out.
        changed = b.set_endpoints(endpoints, now) or new
        changed |= b.set_freshness(stale, now if fetched_at is None else fetched_at)
        return frozenset((name,)) if changed else NO_CHANGES

    def remove_service(self, name: str, now: float) -> Changes:
        self._supersede(name)
        self.last_used.pop(name, None)
        self.vips.release(name)
        if self.services.pop(name, None) is None:
            return NO_CHANGES
        self.leases.drop_service(name)
        return frozenset((name,))

    def replace_all(self, services: Mapping[str, Sequence[Endpoint]], now: float) -> Changes:
        """Make the catalog exactly `services` (the file source)."""
        changed: set[str] = set()
        for name in [n for n in self.services if n not in services]:
            changed |= self.remove_service(name, now)
        self.vips.assign(services)  # a whole catalog at once: pool VIPs in name order
        for name, eps in services.items():
            changed |= self.set_service(name, eps, now)
        return frozenset(changed)

    def reconfigure(self, config: AgentConfig, now: float) -> Changes:
        """Apply a reloaded config. A service whose settings changed gets a new balancer that
        adopts the old one's endpoints, health and load, so answers continue without a gap
        and leases opened before the reload are still counted and still close."""
        old = self.config
        self.config = config
        self.leases.ttl = config.lease_ttl
        # Unfinished stepped updates were derived under the old settings: applied in line
        # below, after the balancers are rebuilt (a config reload is rare; losing them is not).
        pending, self.set_builds = self.set_builds, {}
        for build in pending.values():
            build.current = False
        moved = (old.node, old.zone, old.region) != (config.node, config.zone, config.region)
        self.vips = self.vips.rebuilt(*_vip_settings(config), self.services)
        changed = set()
        for name, b in list(self.services.items()):
            if moved or old.service(name) != config.service(name):
                nb = ServiceBalancer(name, config.service(name), self.rng, self._here(), self.table_builds)
                nb.adopt(b, now)
                nb.set_vip(self.vips.get(name))
                self.services[name] = nb
                changed.add(name)
            elif b.set_vip(self.vips.get(name)):
                changed.add(name)
        for name, build in pending.items():
            changed |= self.set_service(name, build.given, now, stale=build.stale, fetched_at=build.fetched_at)
        return frozenset(changed)

    # ----------------------------------------------------------------- picks and verdicts

    def pick(
        self,
        service: str,
        now: float,
        *,
        key: str | None = None,
        tags: tuple[str, ...] = (),
        source: str | None = None,
        scope: LeaseScope = LeaseScope.REQUEST,
    ) -> Pick | Pending:
        b = self.services.get(service)
        if b is None:
            return self._unknown(service)
        ep = self._choose(b, service, now, key, tags, source)
        lease_id = None
        if scope is not LeaseScope.NONE:
            le, evicted = self.leases.open(service, ep.id, now, scope)
            lease_id = le.id
            b.on_start(ep.id, now)
            self._end_without_verdict(evicted, now)
        age = None if b.fetched_at is None or not b.stale else max(0.0, now - b.fetched_at)
        wire = b.packed.get(ep.id) or pack_endpoint_fields(ep)
        return Pick(ep, lease_id, b.panic, b.stale, age, wire)

    def pick_held(self, service: str, now: float, *, key: str | None = None,
                  source: str | None = None) -> tuple[Endpoint, int] | Pending:
        """`pick(service, now, key=key, source=source, scope=LeaseScope.HELD)` for the
        agent's own per-request paths (the proxy): the endpoint and the lease's id, without
        what an answer to a caller carries (wire fields, panic, staleness). The same
        policy, counters, load and lease."""
        b = self.services.get(service)
        if b is None:
            return self._unknown(service)
        ep = self._choose(b, service, now, key, (), source)
        lease_id = self.leases.open_held(service, ep.id, now)
        b.on_start(ep.id, now)
        return ep, lease_id

    def _unknown(self, service: str) -> Pending:
        if self.on_demand:
            return Pending(service)
        self.unknown_service_picks += 1
        raise RequestError(ErrorCode.UNKNOWN_SERVICE, f"unknown service \"{service}\"")

    def _choose(self, b: ServiceBalancer, service: str, now: float, key: str | None, tags: tuple[str, ...],
                source: str | None) -> Endpoint:
        deadline = b.next_deadline()
        if deadline is not None and now >= deadline and b.tick(now):
            # An ejection ran out since the last tick: return the endpoint before picking.
            self._deferred.add(service)
        self.last_used[service] = now
        ep = b.pick(key, source, tags, now)
        c = b.counters
        if ep is None:
            c.no_healthy += 1
            raise RequestError(ErrorCode.NO_HEALTHY_ENDPOINT, b.why_empty(now, tags))
        c.resolved += 1
        ec = c.endpoints.get(ep.id)
        if ec is None:
            ec = c.endpoint(ep.id)
        ec.picks += 1
        return ep

    def finish(self, lease: int, now: float, *, ok: bool = True, latency: float | None = None) -> Changes:
        """A lease ends with a verdict: load drops, and the outcome feeds latency-aware
        policies and outlier detection. `latency` defaults to the lease's age."""
        le = self.leases.close(lease)
        if le is None:
            raise RequestError(ErrorCode.UNKNOWN_LEASE, f"lease {lease} is unknown or expired")
        if latency is None:
            latency = max(0.0, now - le.started)
        b = self.services.get(le.service)
        if b is None:
            return NO_CHANGES
        if le.endpoint_id in b.by_id:  # not one that left the catalog meanwhile
            b.counters.report(le.endpoint_id, ok, latency)
        b.on_finish(le.endpoint_id, ok, latency, now)
        return frozenset((b.name,)) if b.record_outcome(le.endpoint_id, ok, now) else NO_CHANGES

    def release(self, lease: int, now: float) -> None:
        """A lease ends with no verdict (its caller went away): the load drops, nothing is
        invented about the endpoint. Unknown leases are ignored."""
        le = self.leases.close(lease)
        if le is not None:
            self._end_without_verdict([le], now)

    def report(
        self,
        now: float,
        ok: bool,
        latency: float | None = None,
        lease: int | None = None,
        service: str | None = None,
        endpoint_id: str | None = None,
    ) -> Changes:
        """A caller's outcome for a pick: by lease (ends it) or by service + endpoint id."""
        if lease is not None:
            return self.finish(lease, now, ok=ok, latency=latency)
        if service is None or endpoint_id is None:
            raise RequestError(ErrorCode.BAD_ARGUMENT, "report needs \"lease\", or \"service\" and \"endpoint\"")
        b = self.services.get(service)
        if b is None:
            raise RequestError(ErrorCode.UNKNOWN_SERVICE, f"unknown service \"{service}\"")
        if endpoint_id not in b.by_id:
            raise RequestError(ErrorCode.BAD_ARGUMENT, f"service \"{service}\" has no endpoint \"{endpoint_id}\"")
        b.counters.report(endpoint_id, ok, latency)
        # No lease: a request started and ended as far as the policy can tell.
        b.on_start(endpoint_id, now)
        b.on_finish(endpoint_id, ok, latency, now)
        return frozenset((service,)) if b.record_outcome(endpoint_id, ok, now) else NO_CHANGES

    def probe_result(self, service: str, endpoint_id: str, ok: bool, now: float, detail: str = "") -> Changes:
        """An active probe's verdict. Results for services or endpoints that are gone (the
        catalog moved on while the probe ran) are ignored."""
        b = self.services.get(service)
        if b is not None and b.probe_result(endpoint_id, ok, now, detail):
            return frozenset((service,))
        return NO_CHANGES

    def _end_without_verdict(self, leases: list[Lease], now: float) -> None:
        # An expired or evicted lease ends with no verdict: the request count drops, but
        # no success or failure is invented for it.
        for le in leases:
            b = self.services.get(le.service)
            if b is not None:
                b.on_finish(le.endpoint_id, True, None, now)

    def mark_used(self, service: str, now: float) -> None:
        """A use that is not a pick (the last watch stream on it ended): on-demand sources
        keep the service for their idle timeout from now."""
        if service in self.services:
            self.last_used[service] = now

    # ----------------------------------------------------------------- timers

    def tick(self, now: float) -> tuple[Changes, float | None]:
        """Run timers due at `now` (lease expiry, ejection expiry, slow start). Returns what
        changed (including changes picks made since the last call) and when to call again
        (None: nothing scheduled)."""
        self._end_without_verdict(self.leases.expire(now), now)
        changed = self._deferred
        self._deferred = set()
        deadlines = [self.leases.next_deadline()]
        for b in self.services.values():
            deadline = b.next_deadline()
            if deadline is not None and now >= deadline:
                if b.tick(now):
                    changed.add(b.name)
                deadline = b.next_deadline()
            deadlines.append(deadline)
        return frozenset(changed), min((d for d in deadlines if d is not None), default=None)

    def take_changes(self) -> Changes:
        """Changes picks made on their own (see `pick`); empty almost always."""
        if not self._deferred:
            return NO_CHANGES
        changed, self._deferred = frozenset(self._deferred), set()
        return changed

    # ----------------------------------------------------------------- views

    def services_summary(self) -> list[dict[str, Any]]:
        return [self.services[n].summary() for n in sorted(self.services)]

    def describe(self, service: str, now: float) -> dict[str, Any]:
        b = self.services.get(service)
        if b is None:
            raise RequestError(ErrorCode.UNKNOWN_SERVICE, f"unknown service \"{service}\"")
        return b.describe(now)

    def hello(self, versions: Sequence[int]) -> dict[str, Any]:
        common = sorted(set(versions) & set(PROTOCOL_VERSIONS))
        if not common:
            raise RequestError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"no common protocol version: client offers {list(versions)}, agent speaks {list(PROTOCOL_VERSIONS)}",
            )
        answer: dict[str, Any] = {
            "version": common[-1],
            "agent": AGENT_NAME,
            "ops": list(OPS),
            "max_frame": self.config.max_frame,
        }
        if self.config.vip_pool:  # optional: lets a connect-time shim pre-filter addresses
            answer["vip_pool"] = self.config.vip_pool
        return answer


def _vip_settings(config: AgentConfig) -> tuple[dict[str, Any], Any]:
    explicit = {n: parse_vip(s.vip) for n, s in config.services.items() if s.vip}
    return explicit, parse_pool(config.vip_pool) if config.vip_pool else None


def _vip_table(config: AgentConfig) -> VipTable:
    return VipTable(*_vip_settings(config))
