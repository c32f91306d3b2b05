"""One service's balancing state: catalog endpoints -> eligible set -> policy -> picks.

The pipeline runs on every change (catalog update, health change, config reload), never per
pick: `refresh` computes which endpoints may be served and hands them to the policy, which
precomputes whatever makes its picks cheap. A pick only reads that result.

    catalog endpoints
      -> eligibility (registry state; active probes and outlier ejection, see _health)
      -> panic (too few eligible: serve all, as Envoy does)
      -> candidates (locality preference, slow start)
      -> policy.update(candidates)
"""

from __future__ import annotations

import random
from typing import Sequence

from ._config import ServiceConfig
from ._counters import ServiceCounters
from ._explain import Why, explain, explain_empty
from ._health import HealthTracker
from ._locality import Locality, nearest_count, prefer_local, within
from ._protocol import pack_endpoint_fields
from ._slowstart import SlowStart
from ._types import Endpoint
from ._vip import Vip
from .policies import POLICIES, LoadBoard, Policy
from .policies._consistent import ConsistentHash, TableBuild


#: Distinct tag filters whose policy instances are kept per service (least recently used
#: go first). Real callers use a handful; a caller inventing tag sets must not grow memory.
MAX_TAG_POLICIES = 64


class ServiceBalancer:
    def __init__(self, name: str, config: ServiceConfig, rng: random.Random, here: Locality = Locality(),
                 builds: list[TableBuild] | None = None) -> None:
        self.name = name
        #: Where the service's policy leaves consistent-hash table rebuilds (None: in line).
        self.builds = builds
        self.config = config
        self.rng = rng
        self.here = here
        #: Requests in flight and latency per endpoint, shared by every view (tag filters)
        #: and kept across policy switches (see policies/_load).
        self.load = LoadBoard()
        self.policy: Policy = self._new_policy()
        #: Which locality level supplied the served set ("" without a preference, or when
        #: no preferred level had endpoints).
        self.locality_level = ""
        self.slow_start = SlowStart(config.slow_start) if config.slow_start > 0 and self.policy.ramps_weights else None
        #: Slow start's effective weights for the served set (None: catalog weights).
        self.weights: dict[str, float] | None = None
        #: When slow-start weights must next be recomputed (None: nothing is ramping).
        self.ramp_deadline: float | None = None
        self.endpoints: tuple[Endpoint, ...] = ()
        #: Every catalog endpoint has weight 0: all count as 1 (see policies/_base).
        self.all_zero = False
        self.catalog_endpoints: tuple[Endpoint, ...] = ()
        self.by_id: dict[str, Endpoint] = {}
        #: endpoint id -> its constant resolve-answer fields, packed once per change.
        self.packed: dict[str, bytes] = {}
        self.served: tuple[Endpoint, ...] = ()
        self.eligible_count = 0
        self.panic = False
        self.stale = False
        self.fetched_at: float | None = None
        #: Registry state, active probes, outlier ejection and panic (see _health).
        self.health = HealthTracker(config)
        #: Bumped whenever what `watch` shows changes.
        self.version = 0
        #: Answers and outcomes, for metrics (read at scrape time).
        self.counters = ServiceCounters()
        #: Per-request tag filters get their own policy instance over the filtered set,
        #: built on first use and dropped on every refresh.
        self._tag_policies: dict[tuple[str, ...], Policy] = {}
        #: The service's address for connect-time balancing (the engine's VipTable sets it).
        self.vip: Vip | None = None

    def set_vip(self, vip: Vip | None) -> bool:
        if vip == self.vip:
            return False
        self.vip = vip
        self.version += 1
        return True

    # ----------------------------------------------------------------- inputs

    def _new_policy(self, *, main: bool = True) -> Policy:
        policy = POLICIES[self.config.policy](rng=self.rng, options=self.config.options, load=self.load)
        if main and isinstance(policy, ConsistentHash):
            policy.defer = self.builds  # tag views are small and cached: they build in line
        return policy

    def set_endpoints(self, endpoints: Sequence[Endpoint], now: float, *, force: bool = False) -> bool:
        """Replace the catalog's endpoint set. True when anything changed.

        `force` applies the set even when it equals the current one (a balancer adopting
        another's state must bring health and the policy in line with it)."""
        # Ids key health, leases and reports, so they must be unique; a source that repeats
        # one (a hand-edited snapshot, a buggy registry) gets its first occurrence served
        # rather than a half-applied update.
        first: dict[str, Endpoint] = {}
        for e in endpoints:
            first.setdefault(e.id, e)
        eps = tuple(first.values())
        #: The catalog's set before this service's tag filter, so a reload that changes
        #: the filter can re-apply it to everything.
        self.catalog_endpoints = eps
        if self.config.tags:
            need = set(self.config.tags)
            eps = tuple(e for e in eps if need.issubset(e.tags))
        if eps == self.endpoints and not force:
            return False
        changed = eps != self.endpoints
        self.endpoints = eps
        self.by_id = {e.id: e for e in eps}
        self.counters.keep_only(self.by_id)
        self.packed = {e.id: pack_endpoint_fields(e) for e in eps}
        # The weight-0 rule is decided on the whole catalog set, never on a subset.
        self.all_zero = bool(eps) and all(e.weight <= 0 for e in eps)
        self.load.forget(set(self.by_id))
        self.health.set_endpoints(eps, now)
        self.refresh(now)
        return changed

    def set_freshness(self, stale: bool, fetched_at: float | None) -> bool:
        changed = stale != self.stale
        self.stale, self.fetched_at = stale, fetched_at
        if changed:
            self.version += 1
        return changed

    def adopt(self, old: ServiceBalancer, now: float) -> None:
        """Take over another balancer's endpoints (config reload switched policy or settings).
        Health state carries over: a reload must not resurrect a dead or ejected endpoint."""
        self.stale, self.fetched_at = old.stale, old.fetched_at
        self.version = old.version
        self.counters = old.counters
        self.vip = old.vip
        self.health = old.health
        self.health.reconfigure(self.config, now)
        # Leases opened under the old policy still close here, and are still counted.
        old.load.decay = self.load.decay
        self.load = old.load
        self.policy = self._new_policy()
        # Forced: the old health tracker knows the old filtered set; with a new tag filter
        # it must learn the new one even when that is empty, or it would keep serving
        # endpoints this balancer no longer lists.
        self.set_endpoints(old.catalog_endpoints, now, force=True)

    # Health inputs: each returns True when eligibility or panic changed (and refreshed).

    def probe_result(self, endpoint_id: str, ok: bool, now: float, detail: str = "") -> bool:
        return self._refreshed(self.health.probe_result(endpoint_id, ok, now, detail), now)

    def record_outcome(self, endpoint_id: str, ok: bool, now: float) -> bool:
        """A caller's (or the proxy's) verdict on one request, for outlier ejection."""
        return self._refreshed(self.health.report(endpoint_id, ok, now), now)

    def tick(self, now: float) -> bool:
        """Timers due at `now`: return ejected endpoints whose time is up (a change of the
        served set, True), and advance slow-start ramps (weights only)."""
        if self._refreshed(self.health.tick(now), now):
            return True  # refresh already recomputed the ramp
        self._advance_ramp(now)
        return False

    def next_deadline(self) -> float | None:
        d = self.health.next_deadline()
        r = self.ramp_deadline
        return r if d is None else d if r is None else min(d, r)

    def _refreshed(self, changed: bool, now: float) -> bool:
        if changed:
            self.refresh(now)
        return changed

    # ----------------------------------------------------------------- derivation

    def eligible(self, now: float) -> tuple[Endpoint, ...]:
        return self.health.eligible(now)

    def _local_served(self, eligible: tuple[Endpoint, ...], now: float) -> tuple[Endpoint, ...]:
        """What the policy serves: the nearest preferred locality level that has eligible
        endpoints; in panic, every candidate at that same level.

        The level is always chosen from the eligible set. Choosing it from all candidates
        in panic would keep a zone whose endpoints are all dead as "nearest" and send every
        request there while healthy endpoints wait one level out.
        """
        choice = prefer_local(eligible, self.config.locality, self.here)
        self.locality_level = choice.level
        if not self.panic:
            return choice.endpoints
        pool = self.health.serving(now)  # in panic: every candidate, eligible or not
        if choice.level in ("node", "zone", "region"):
            mine = getattr(self.here, choice.level)
            return tuple(e for e in pool if getattr(e, choice.level) == mine)
        if nearest_count(choice.level) is not None:
            return within(pool, choice.endpoints)
        if choice.level == "" and self.config.locality:
            # Nothing eligible at any preferred level and no "*": stay local, as outside panic.
            return prefer_local(pool, self.config.locality, self.here).endpoints
        return pool

    def _ramp(self, eligible: tuple[Endpoint, ...], served: tuple[Endpoint, ...], now: float) -> dict[str, float] | None:
        """Slow start: note who (re)joined the eligible set; the served set's ramped weights
        (None: no slow start, catalog weights)."""
        ss = self.slow_start
        if ss is None:
            return None
        ss.observe((e.id for e in eligible), now)
        self.ramp_deadline = ss.next_refresh(now)
        return ss.weights(served, now)

    def _weights(self, ramped: dict[str, float] | None) -> dict[str, float] | None:
        """The weights the policy picks by: in an all-zero catalog every endpoint counts as
        1 (scaled by slow start's ramp share when one is running)."""
        if not self.all_zero:
            return ramped
        return {e.id: 1.0 if ramped is None else ramped.get(e.id, 1.0) for e in self.served}

    def _advance_ramp(self, now: float) -> None:
        """Move slow-start weights along. The served set does not change, so watchers are
        not notified; only the policy's weights move."""
        if self.slow_start is None or self.ramp_deadline is None or now < self.ramp_deadline:
            return
        self.weights = self._weights(self.slow_start.weights(self.served, now))
        self.ramp_deadline = self.slow_start.next_refresh(now)
        self.policy.update(self.served, now, self.weights)
        self._tag_policies.clear()

    def refresh(self, now: float) -> None:
        eligible = self.eligible(now)
        self.eligible_count = len(eligible)
        # Panic: below the threshold share of eligible endpoints, spread load over every
        # candidate (all but maintenance) rather than pile it onto the few left.
        self.panic = self.health.in_panic(now)
        served = self._local_served(eligible, now)
        if not self.all_zero:
            # Weight 0 means drained: never picked, not even when health or locality leaves
            # nothing else (that is "no healthy endpoint", not a reason to use a drained one).
            served = tuple(e for e in served if e.weight > 0)
        self.served = served
        self.weights = self._weights(self._ramp(eligible, served, now))
        self.policy.update(served, now, self.weights)
        self._tag_policies.clear()
        self.version += 1

    # ----------------------------------------------------------------- picking

    def pick(self, key: str | None, source: str | None, tags: tuple[str, ...], now: float) -> Endpoint | None:
        if not tags:
            return self.policy.pick(key, source, now)
        cache = self._tag_policies
        policy = cache.pop(tags, None)
        if policy is None:
            need = set(tags)
            subset = tuple(e for e in self.served if need.issubset(e.tags))
            if not subset:
                return None  # not cached: callers choose tag sets, so misses must cost nothing
            policy = self._new_policy(main=False)  # a view: same load board, its own index
            policy.update(subset, now, self.weights)
            if len(cache) >= MAX_TAG_POLICIES:
                del cache[next(iter(cache))]  # least recently used
        cache[tags] = policy  # (re)inserted last: dict order is the LRU order
        return policy.pick(key, source, now)

    def on_start(self, endpoint_id: str, now: float) -> None:
        self.policy.on_start(endpoint_id, now)  # the shared board: every view sees it

    def on_finish(self, endpoint_id: str, ok: bool, latency: float | None, now: float) -> None:
        self.policy.on_finish(endpoint_id, ok, latency, now)

    # ----------------------------------------------------------------- views

    def explain(self, now: float, request_tags: tuple[str, ...] = ()) -> list[Why]:
        """Why each catalog endpoint is or is not served (softlb/_explain.py)."""
        health = {row.id: row for row in self.health.snapshot(now).endpoints}
        return explain(self.name, self.catalog_endpoints, self.config, self.here, health,
                       {e.id for e in self.served}, self.panic, self.weights, self.locality_level, now,
                       request_tags)

    def why_empty(self, now: float, request_tags: tuple[str, ...] = ()) -> str:
        return explain_empty(self.name, self.explain(now, request_tags), self.config)

    def describe(self, now: float) -> dict[str, object]:
        """`eligible`: passes registry, probe and ejection checks; `served`: picks may land on
        it now (in panic that includes ineligible endpoints); `health`: the detail; `why`:
        the reason it is not served (or a note on how it is). Endpoints the service's tag
        filter drops are listed too, with `filtered` true and no health."""
        health = {row.id: row for row in self.health.snapshot(now).endpoints}
        whys = {w.id: w for w in self.explain(now)}
        eps = []
        for e in self.catalog_endpoints:
            h = health.get(e.id)
            w = whys[e.id]
            eps.append(dict(e.as_dict(), eligible=False if h is None else h.eligible, served=w.served,
                            filtered=h is None, health=None if h is None else h.as_dict(precision=3),
                            why=w.as_dict()))
        return self._with_vip({
            "service": self.name,
            "policy": self.config.policy,
            "version": self.version,
            "panic": self.panic,
            "panic_threshold": self.config.panic_threshold,
            "stale": self.stale,
            "age": None if self.fetched_at is None else round(max(0.0, now - self.fetched_at), 3),
            "tags": list(self.config.tags),
            "locality": list(self.config.locality),
            "locality_level": self.locality_level,
            "here": {"node": self.here.node, "zone": self.here.zone, "region": self.here.region},
            "endpoints": eps,
        })

    def summary(self) -> dict[str, object]:
        return self._with_vip({
            "name": self.name,
            "policy": self.config.policy,
            "endpoints": len(self.endpoints),
            "eligible": self.eligible_count,
            #: Before the service's tag filter, and what picks land on now (after locality).
            "catalog_endpoints": len(self.catalog_endpoints),
            "served": len(self.served),
            "panic": self.panic,
            "stale": self.stale,
        })

    def _with_vip(self, d: dict[str, object]) -> dict[str, object]:
        # Absent rather than nil when there is none: an optional field old clients skip.
        if self.vip is not None:
            d["vip"] = self.vip.as_dict()
        return d
