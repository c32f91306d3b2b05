"""Plain round robin: every pickable endpoint in turn, ignoring weight magnitudes.

Weight 0 still means "do not pick" (Consul operators drain an instance with Weights 0), so
zero-weight endpoints are skipped unless all are zero; see `effective_weights`.
"""

from __future__ import annotations

from typing import Any, Generator, Mapping, Sequence

from .._types import Endpoint
from ._base import Policy, effective_weights, effective_weights_steps


class RoundRobin(Policy):
    name = "round_robin"

    _endpoints: tuple[Endpoint, ...] = ()
    _next = 0

    def update(
        self, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        self.update_prepared(tuple(ep for ep, _ in effective_weights(endpoints)), endpoints, now)

    def prepare_steps(
        self, endpoints: Sequence[Endpoint], weights: Mapping[str, float] | None, chunk: int
    ) -> Generator[int, None, Any]:
        pairs = yield from effective_weights_steps(endpoints, None, chunk)  # weights: see update
        picked: list[Endpoint] = []
        for i in range(0, len(pairs), chunk):
            picked += [ep for ep, _ in pairs[i : i + chunk]]
            yield chunk
        return tuple(picked)

    def update_prepared(
        self, prepared: Any, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        self._endpoints = prepared
        # Randomised start so a fleet of agents restarted together does not send every
        # host's first request to the same backend (envoy's seed_, grpc-go's random start).
        self._next = self.rng.randrange(len(self._endpoints)) if self._endpoints else 0

    def pick(self, key: str | None, source: str | None, now: float) -> Endpoint | None:
        eps = self._endpoints
        if not eps:
            return None
        i = self._next
        if i >= len(eps):
            i = 0
        self._next = i + 1
        return eps[i]
