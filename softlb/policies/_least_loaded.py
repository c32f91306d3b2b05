"""Shared machinery of the IPVS-style "least loaded" policies: lc, sed and nq.

Each endpoint has a score computed from its open leases and its weight; a pick returns the
lowest score. Instead of IPVS's O(n) scan per pick, scores live in a binary heap with lazy
deletion: a change pushes a fresh entry and the old one is discarded when it surfaces, so
picks and lease events are O(log n) amortised. The heap is compacted when stale entries
outnumber live ones.

Ties (common: every idle endpoint scores the same) are broken randomly in proportion to
weight. Each endpoint carries the next arrival time of its own Poisson process with rate
equal to its weight; among tied endpoints the earliest arrival wins and draws its next one.
Merged independent Poisson processes label each arrival independently with probability
w / sum(w), so the tied endpoints are chosen i.i.d. weighted-randomly. An endpoint that
rejoins the tie after a busy spell restarts its process from the current race time (the
exponential is memoryless), rather than winning a burst of catch-up picks.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from heapq import heapify, heappop, heappush
from typing import Mapping, Sequence

from .._types import Endpoint
from ._base import Policy, effective_weights
from ._load import LoadBoard

#: Compact the heap once it holds this many times more entries than endpoints.
_COMPACT_FACTOR = 3


class _Member:
    __slots__ = ("endpoint", "weight", "arrival", "entry")

    def __init__(self, endpoint: Endpoint, weight: float, arrival: float) -> None:
        self.endpoint = endpoint
        self.weight = weight
        self.arrival = arrival
        self.entry: tuple[float, float, str] | None = None


class LeastLoaded(Policy):
    ramps_weights = True

    def __init__(self, *, rng: random.Random, options: Mapping[str, object] | None = None,
                 load: LoadBoard | None = None) -> None:
        super().__init__(rng=rng, options=options, load=load)
        self.load.listen(self)  # re-rank an endpoint whenever its load moves, whoever picked it
        self._members: dict[str, _Member] = {}
        self._heap: list[tuple[float, float, str]] = []
        self._race = 0.0  # arrival time of the last tie-break winner

    @staticmethod
    @abstractmethod
    def score(active: int, weight: float) -> float:
        """Lower is picked first."""

    def update(
        self, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        old = self._members
        members: dict[str, _Member] = {}
        for ep, w in effective_weights(endpoints, weights):
            prev = old.get(ep.id)
            if prev is not None and prev.weight == w and prev.arrival >= self._race:
                arrival = prev.arrival
            else:
                arrival = self._race + self.rng.expovariate(w)
            members[ep.id] = _Member(ep, w, arrival)
        self._members = members
        self._rebuild()

    def pick(self, key: str | None, source: str | None, now: float) -> Endpoint | None:
        heap = self._heap
        members = self._members
        while heap:
            entry = heap[0]
            m = members.get(entry[2])
            if m is None or m.entry is not entry:
                heappop(heap)
                continue
            self._race = m.arrival
            m.arrival += self.rng.expovariate(m.weight)
            self._push(m)
            return m.endpoint
        return None

    def load_changed(self, endpoint_id: str) -> None:
        m = self._members.get(endpoint_id)
        if m is None:
            return
        if m.arrival < self._race:
            m.arrival = self._race + self.rng.expovariate(m.weight)
        self._push(m)
        if len(self._heap) > _COMPACT_FACTOR * len(self._members) + 16:
            self._rebuild()

    def _entry(self, m: _Member) -> tuple[float, float, str]:
        m.entry = (self.score(self.load.in_flight(m.endpoint.id), m.weight), m.arrival, m.endpoint.id)
        return m.entry

    def _push(self, m: _Member) -> None:
        heappush(self._heap, self._entry(m))

    def _rebuild(self) -> None:
        self._heap = [self._entry(m) for m in self._members.values()]
        heapify(self._heap)
