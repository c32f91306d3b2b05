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
from ._protocol import pack_endpoint_fields
from ._types import Endpoint, RegistryHealth
from .policies import POLICIES, Policy

_SERVABLE = (RegistryHealth.PASSING, RegistryHealth.WARNING)


class ServiceBalancer:
    def __init__(self, name: str, config: ServiceConfig, rng: random.Random) -> None:
        self.name = name
        self.config = config
        self.rng = rng
        self.policy: Policy = POLICIES[config.policy](rng=rng, options=config.options)
        self.endpoints: tuple[Endpoint, ...] = ()
        self.by_id: dict[str, Endpoint] = {}
        #: endpoint id -> its constant resolve-answer fields, packed once per change.
        self.packed: dict[str, bytes] = {}
        self.served: tuple[Endpoint, ...] = ()
        self.eligible_count = 0
        self.panic = False
        self.stale = False
        self.fetched_at: float | None = None
        #: Bumped whenever what `watch` shows changes.
        self.version = 0
        #: Per-request tag filters get their own policy instance over the filtered set,
        #: built on first use and dropped on every refresh.
        self._tag_policies: dict[tuple[str, ...], Policy] = {}

    # ----------------------------------------------------------------- inputs

    def set_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> bool:
        """Replace the catalog's endpoint set. True when anything changed."""
        eps = tuple(endpoints)
        if self.config.tags:
            need = set(self.config.tags)
            eps = tuple(e for e in eps if need.issubset(e.tags))
        if eps == self.endpoints:
            return False
        self.endpoints = eps
        self.by_id = {e.id: e for e in eps}
        self.packed = {e.id: pack_endpoint_fields(e) for e in eps}
        self.refresh(now)
        return True

    def set_freshness(self, stale: bool, fetched_at: float | None) -> bool:
        changed = stale != self.stale
        self.stale, self.fetched_at = stale, fetched_at
        if changed:
            self.version += 1
        return changed

    def adopt(self, old: ServiceBalancer, now: float) -> None:
        """Take over another balancer's endpoints (config reload switched policy or settings)."""
        self.stale, self.fetched_at = old.stale, old.fetched_at
        self.version = old.version
        self.set_endpoints(old.endpoints, now)
        self.refresh(now)

    # ----------------------------------------------------------------- derivation

    def eligible(self, now: float) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.registry in _SERVABLE)

    def candidates(self, pool: tuple[Endpoint, ...], now: float) -> tuple[Endpoint, ...]:
        """Narrow the pool the policy sees (locality preference, slow start)."""
        return pool

    def refresh(self, now: float) -> None:
        eligible = self.eligible(now)
        total = len(self.endpoints)
        self.eligible_count = len(eligible)
        threshold = self.config.panic_threshold
        # Panic: below the threshold share of eligible endpoints, spread load over every
        # endpoint rather than pile it onto the few left (Envoy's isHostSetInPanic).
        self.panic = bool(total) and threshold > 0 and len(eligible) * 100 < threshold * total
        # Maintenance is an operator's deliberate drain: not even panic sends traffic there.
        pool = tuple(e for e in self.endpoints if e.registry is not RegistryHealth.MAINTENANCE) if self.panic else eligible
        served = self.candidates(pool, now)
        self.policy.update(served, now)
        self._tag_policies.clear()
        if served != self.served:
            self.served = served
        self.version += 1

    # ----------------------------------------------------------------- picking

    def pick(self, key: str | None, source: str | None, tags: tuple[str, ...], now: float) -> Endpoint | None:
        if not tags:
            return self.policy.pick(key, source, now)
        policy = self._tag_policies.get(tags)
        if policy is None:
            need = set(tags)
            policy = POLICIES[self.config.policy](rng=self.rng, options=self.config.options)
            policy.update(tuple(e for e in self.served if need.issubset(e.tags)), now)
            self._tag_policies[tags] = policy
        return policy.pick(key, source, now)

    def on_start(self, endpoint_id: str, now: float) -> None:
        self.policy.on_start(endpoint_id, now)

    def on_finish(self, endpoint_id: str, ok: bool, latency: float | None, now: float) -> None:
        self.policy.on_finish(endpoint_id, ok, latency, now)

    # ----------------------------------------------------------------- views

    def describe(self, now: float) -> dict[str, object]:
        served = {e.id for e in self.served}
        return {
            "service": self.name,
            "policy": self.config.policy,
            "version": self.version,
            "panic": self.panic,
            "stale": self.stale,
            "age": None if self.fetched_at is None else round(max(0.0, now - self.fetched_at), 3),
            "endpoints": [dict(e.as_dict(), eligible=e.id in served) for e in self.endpoints],
        }

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "policy": self.config.policy,
            "endpoints": len(self.endpoints),
            "eligible": self.eligible_count,
            "panic": self.panic,
            "stale": self.stale,
        }
