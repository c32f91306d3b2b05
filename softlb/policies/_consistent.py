"""What the consistent-hash policies (ring_hash, maglev, source_hash) share.

They place endpoints by catalog weight only: slow start's ramped weights are ignored,
because moving a key to a newcomer in small steps and back is worse than moving it once.
Placement depends only on the endpoint ids and weights, never on list order or the rng, so
every agent, and the same agent after a restart, maps a key to the same endpoint.

A pick with no key (or, for source_hash, no source) has nothing to be consistent about
and falls back to a weighted random pick among the same endpoints.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Mapping, Sequence

from .._types import Endpoint
from ._base import Policy, WeightedSampler, effective_weights
from ._hashing import hash64


class ConsistentHash(Policy):
    _signature: tuple[tuple[Endpoint, float], ...] | None = None
    _fallback = WeightedSampler(())

    def update(
        self, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        # Sorted by id: placement must not depend on the order the catalog listed them in.
        pairs = tuple(sorted(effective_weights(endpoints), key=lambda p: p[0].id))
        if pairs == self._signature:
            return  # same set: skip the (comparatively costly) rebuild
        self._signature = pairs
        self._fallback = WeightedSampler(pairs)
        self._build([ep for ep, _ in pairs], [max(1, round(w)) for _, w in pairs])

    def pick(self, key: str | None, source: str | None, now: float) -> Endpoint | None:
        text = self.hash_input(key, source)
        if text is None or not self._fallback.endpoints:
            return self._fallback.sample(self.rng)
        return self._lookup(hash64(text))

    def hash_input(self, key: str | None, source: str | None) -> str | None:
        """What to hash: the caller's key (source_hash overrides this with the source)."""
        return key

    @abstractmethod
    def _build(self, endpoints: list[Endpoint], weights: list[int]) -> None:
        """Precompute placement for a non-empty or empty, id-sorted endpoint list."""

    @abstractmethod
    def _lookup(self, h: int) -> Endpoint:
        """The endpoint owning 64-bit hash `h` (only called when there are endpoints)."""
