"""Plain round robin: every eligible endpoint in turn, ignoring weights."""

from __future__ import annotations

from typing import Sequence

from .._types import Endpoint
from ._base import Policy


class RoundRobin(Policy):
    name = "round_robin"

    _endpoints: tuple[Endpoint, ...] = ()
    _next = 0

    def update(self, endpoints: Sequence[Endpoint], now: float) -> None:
        self._endpoints = tuple(endpoints)
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
