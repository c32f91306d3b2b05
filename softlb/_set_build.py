"""Applying one giant endpoint set in bounded steps (issue 10, item 9).

`ServiceBalancer.set_endpoints` is one call: dedupe, packing each endpoint's answer fields,
the health table, eligibility, the served set, the policy. At 100,000 endpoints that is
~1.8 s, and a 5,000-endpoint Consul service changing every second costs ~278 ms per change:
a stall for every client on the host. An `EndpointSetBuild` does the same work on private
data, `step(budget)` at a time (budget: endpoints of work), while the balancer keeps
serving the set it had; `Engine.install_set` then swaps the result in with a few
assignments and the policy update. The shape is the consistent-hash `TableBuild`'s
(policies/_consistent.py): the caller runs the steps with a checkpoint between them.

What install leaves is what `set_endpoints` called at install time would leave:

- Probe results, reports and ejections that arrive during the build land on the live
  table; an endpoint that stays shares its probe and outlier state objects with the table
  being built, so they carry over. Eligibility derived before such a result is re-derived
  (the health tracker's `epoch` tells), in steps while there are steps left, else in line.
- Leases, load and counters are the balancer's: install trims them as set_endpoints does.
- A newer update of the service (or its removal, or a config reload) supersedes the build:
  the engine forgets it and `install_set` refuses it.

Builds are for big sets only (Engine.SET_STEP_MIN): a small set costs less in line than a
turn of the loop. Services with slow start are applied in line (its ramp is stateful).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generator, Sequence

from ._health import Derived
from ._protocol import pack_endpoint_fields
from ._types import Endpoint

if TYPE_CHECKING:
    from ._balancer import ServiceBalancer

#: Endpoints of work between two points where a step may end.
CHUNK = 64
#: Times eligibility is re-derived in steps when results keep moving it; then at install.
REDERIVE_TRIES = 3


class EndpointSetBuild:
    __slots__ = ("name", "balancer", "given", "stale", "fetched_at", "catalog", "endpoints", "same", "by_id",
                 "packed", "all_zero", "ids", "entries", "derived", "panic", "level", "served", "weights", "prepared", "_work", "done", "current")

    def __init__(self, name: str, balancer: ServiceBalancer, endpoints: Sequence[Endpoint], *, stale: bool,
                 fetched_at: float | None) -> None:
        self.name = name
        #: The balancer it installs into (a new service's is not in the engine until then).
        self.balancer = balancer
        self.given = endpoints
        self.stale, self.fetched_at = stale, fetched_at
        self.catalog: tuple[Endpoint, ...] = ()
        self.endpoints: tuple[Endpoint, ...] = ()
        #: The (filtered) set equals the balancer's: install changes nothing but the catalog.
        self.same = False
        self.by_id: dict[str, Endpoint] = {}
        self.packed: dict[str, bytes] = {}
        self.all_zero = False
        self.ids: frozenset[str] = frozenset()
        self.entries: dict = {}
        self.derived: Derived | None = None
        self.panic = False
        self.level = ""
        self.served: tuple[Endpoint, ...] = ()
        self.weights: dict[str, float] | None = None
        #: The policy's share of the work (Policy.prepare_steps), for update_prepared.
        self.prepared: object = None
        self._work = self._steps()
        self.done = False
        #: False once a newer update of the service superseded it (install refuses it then).
        self.current = True

    def step(self, budget: int) -> bool:
        """Do about `budget` endpoints of work; True when the build is complete."""
        spent = 0
        while spent < budget and not self.done:
            try:
                spent += next(self._work)
            except StopIteration:
                self.done = True
        return self.done

    def run(self) -> None:
        """Every step at once (tests)."""
        while not self.step(1 << 30):
            pass

    def _steps(self) -> Generator[int, None, None]:
        b = self.balancer
        # Ids must be unique: the first occurrence wins, as in set_endpoints.
        first: dict[str, Endpoint] = {}
        for i, e in enumerate(self.given):
            first.setdefault(e.id, e)
            if i % CHUNK == CHUNK - 1:
                yield CHUNK
        self.catalog = eps = tuple(first.values())
        if b.config.tags:
            need = set(b.config.tags)
            eps = tuple(e for e in eps if need.issubset(e.tags))
            yield len(eps) // 4 + 1
        self.endpoints = eps
        # Equal to what is served (set_endpoints' early return), compared a chunk at a time.
        current = b.endpoints
        self.same = len(eps) == len(current)
        for i in range(0, len(eps), CHUNK) if self.same else ():
            if eps[i : i + CHUNK] != current[i : i + CHUNK]:
                self.same = False
                break
            yield CHUNK
        if self.same:
            return
        # Answer fields, packed once per change; an endpoint that did not change keeps its bytes.
        old_by_id, old_packed = b.by_id, b.packed
        by_id, packed = self.by_id, self.packed
        for i, e in enumerate(eps):
            by_id[e.id] = e
            o = old_by_id.get(e.id)
            packed[e.id] = old_packed[e.id] if o is not None and (o is e or o == e) else pack_endpoint_fields(e)
            if i % CHUNK == CHUNK - 1:
                yield CHUNK
        self.all_zero = bool(eps) and all(e.weight <= 0 for e in eps)
        self.ids = frozenset(by_id)
        yield len(eps) // 16 + 1
        self.entries = yield from b.health.entries_steps(eps, CHUNK)
        for _ in range(REDERIVE_TRIES):
            self.derived = yield from b.health.derive_steps(self.entries, CHUNK)
            if self.derived.epoch == b.health.epoch:
                break
        self.panic, self.level, self.served = b.served_from(self.derived.eligible, self.derived.candidates,
                                                            self.all_zero)
        yield len(self.served) // 8 + 1
        self.weights = b.weights_for(self.served, self.all_zero)
        self.prepared = yield from b.policy.prepare_steps(self.served, self.weights, CHUNK)
