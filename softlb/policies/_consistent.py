"""What the consistent-hash policies (ring_hash, maglev, source_hash) share.

They place endpoints by catalog weight only: slow start's ramped weights are ignored,
because moving a key to a newcomer in small steps and back is worse than moving it once.
Placement depends only on the endpoint ids and weights, never on list order or the rng, so
every agent, and the same agent after a restart, maps a key to the same endpoint.

A pick with no key (or, for source_hash, no source) has nothing to be consistent about
and falls back to a weighted random pick among the same endpoints.

Deferred builds (issue 10, item 9): a table build is O(table) in pure Python, 25-77 ms for
maglev at 1,000 endpoints, on every flap. When `defer` is set (the agent sets it), `update`
does only the cheap part in line (the fallback sampler, the set of live ids) and leaves a
`TableBuild` in that list for the caller to run: its `steps()` generator builds a new table
on private data in short steps (~0.1 ms each; the agent runs them in slices of bounded
time and yields to other clients between slices), and `install()` swaps it in unless a newer update has superseded it. Meanwhile the
old table serves, with one guard: a key whose slot holds an endpoint that is no longer live
is re-hashed to the next candidate (a few tries, then the weighted fallback), so no pick
ever returns an endpoint outside the current set.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Generator, Mapping, Sequence

from .._types import Endpoint
from ._base import Policy, WeightedSampler, effective_weights
from ._hashing import hash64


#: Smaller sets are rebuilt in line even when builds are deferred: it costs less than a turn.
DEFER_MIN = 32
#: Re-hashes tried when the (older) table answers with an endpoint that is no longer live.
STALE_TRIES = 8
_MASK64 = (1 << 64) - 1


class TableBuild:
    """A table build left to the caller. `steps()` does the work on private data, yielding
    between short steps (safe to run whole in a worker thread: it writes no shared state);
    then `install()` swaps the table in, on the caller's thread, unless a newer update has
    superseded this build (it returns False then)."""

    __slots__ = ("policy", "signature", "endpoints", "weights", "result")

    def __init__(self, policy: ConsistentHash, signature: object, endpoints: list[Endpoint], weights: list[int]) -> None:
        self.policy = policy
        self.signature = signature
        self.endpoints = endpoints
        self.weights = weights
        self.result: Any = None

    @property
    def current(self) -> bool:
        return self.policy._signature is self.signature

    def steps(self) -> Generator[None, None, None]:
        self.result = yield from self.policy._build_steps(self.endpoints, self.weights)

    def run(self) -> None:
        """All steps at once."""
        for _ in self.steps():
            pass

    def install(self) -> bool:
        if not self.current or self.result is None:
            return False
        self.policy._install(self.result)
        self.policy._installed = True
        return True


class ConsistentHash(Policy):
    _signature: tuple[tuple[Endpoint, float], ...] | None = None
    _fallback = WeightedSampler(())
    #: Ids the current set holds; a table entry outside it is stale (a build is under way).
    _live: frozenset[str] = frozenset()
    #: Where update() leaves table builds for the caller; None: build in line. The first
    #: table is always built in line, so keys are consistent from the first pick.
    defer: list[TableBuild] | None = None
    _installed = False

    def update(
        self, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        # Sorted by id: placement must not depend on the order the catalog listed them in.
        pairs = tuple(sorted(effective_weights(endpoints), key=lambda p: p[0].id))
        if pairs == self._signature:
            return  # same set: skip the (comparatively costly) rebuild
        self._signature = pairs
        self._fallback = WeightedSampler(pairs)
        self._live = frozenset(ep.id for ep, _ in pairs)
        eps, ws = [ep for ep, _ in pairs], [max(1, round(w)) for _, w in pairs]
        if self.defer is not None and self._installed and len(eps) >= DEFER_MIN:
            self.defer.append(TableBuild(self, pairs, eps, ws))
            return
        self._build(eps, ws)

    def _build(self, endpoints: list[Endpoint], weights: list[int]) -> None:
        """Build in line (no deferral)."""
        gen = self._build_steps(endpoints, weights)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                self._install(done.value)
                self._installed = True
                return

    def pick(self, key: str | None, source: str | None, now: float) -> Endpoint | None:
        text = self.hash_input(key, source)
        if text is None or not self._fallback.endpoints:
            return self._fallback.sample(self.rng)
        h = hash64(text)
        ep = self._lookup(h)
        if ep is not None and ep.id in self._live:
            return ep
        # The table predates the current set (a deferred build is under way): try the
        # key's next candidates, the same for every pick of this key, then any live one.
        for k in range(1, STALE_TRIES + 1):
            ep = self._lookup((h + k * 0x9E3779B97F4A7C15) & _MASK64)
            if ep is not None and ep.id in self._live:
                return ep
        return self._fallback.sample(self.rng)

    def hash_input(self, key: str | None, source: str | None) -> str | None:
        """What to hash: the caller's key (source_hash overrides this with the source)."""
        return key

    @abstractmethod
    def _build_steps(self, endpoints: list[Endpoint], weights: list[int]) -> Generator[None, None, Any]:
        """Compute placement for an empty or id-sorted endpoint list, yielding between short
        steps, touching no state of `self` but reading it; returns what `_install` takes."""

    @abstractmethod
    def _install(self, table: Any) -> None:
        """Make a table `_build_steps` returned the one lookups use."""

    @abstractmethod
    def _lookup(self, h: int) -> Endpoint | None:
        """The endpoint owning 64-bit hash `h`; None while there is no table."""
