"""Ketama-style consistent hash ring.

Each endpoint owns `replicas` points per unit of weight on a 64-bit ring; a key goes to the
first point at or after its hash. An endpoint's points depend only on its id, so when one of
N endpoints leaves, only the keys it owned (about 1/N) move, and a new endpoint takes only
the keys that land just before its points.

The ring is capped at `max_ring_size` points: when the total weight would exceed it, every
endpoint's point count is halved (repeatedly) until it fits. Halving keeps each endpoint's
first points, but it does move keys, so it happens only when the total weight crosses a
power-of-two multiple of the cap -- choose the cap above your largest expected total.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Generator

from .._types import Endpoint
from ._consistent import ConsistentHash
from ._hashing import ring_points


#: Endpoints hashed between two yields of a deferred build (160 points each: ~0.1 ms here).
STEP_ENDPOINTS = 4
#: Room for the owner's index below each packed ring position.
_OWNER_BITS = 32


class RingHash(ConsistentHash):
    name = "ring_hash"
    OPTIONS = {"replicas": 160, "max_ring_size": 1 << 18}

    _points: list[int] = []
    _owners: list[Endpoint] = []
    _point_cache: dict[tuple[str, int], list[int]] = {}

    def _build_steps(self, endpoints: list[Endpoint], weights: list[int]) -> Generator[None, None, Any]:
        replicas = int(self.options["replicas"])
        cap = int(self.options["max_ring_size"])
        scale = 1
        while sum(weights) * replicas > cap * scale and scale < 1 << 62:
            scale *= 2
        # Position and owner packed in one int: ints sort markedly faster than tuples or a
        # key function (this sort is most of a rebuild at 1,000 endpoints), and a tie on position (2^-64 odds) still resolves by id
        # order, the same on every agent.
        packed: list[int] = []
        cache: dict[tuple[str, int], list[int]] = {}
        for i, (ep, w) in enumerate(zip(endpoints, weights)):
            count = max(1, w * replicas // scale)
            # Hashing dominates a rebuild; an endpoint that stays keeps its points.
            pts = self._point_cache.get((ep.id, count)) or ring_points(ep.id, count)
            cache[(ep.id, count)] = pts
            packed.extend([(p << _OWNER_BITS) | i for p in pts])
            if i % STEP_ENDPOINTS == STEP_ENDPOINTS - 1:
                yield
        packed.sort()  # one C call: ~10 ms at 160,000 points, the one step that is not short
        yield
        mask = (1 << _OWNER_BITS) - 1
        points = [v >> _OWNER_BITS for v in packed]
        yield
        return cache, points, [endpoints[v & mask] for v in packed]

    def _install(self, table: Any) -> None:
        self._point_cache, self._points, self._owners = table

    def _lookup(self, h: int) -> Endpoint | None:
        if not self._owners:
            return None
        i = bisect_left(self._points, h)
        return self._owners[i if i < len(self._owners) else 0]
