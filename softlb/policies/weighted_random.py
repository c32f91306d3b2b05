"""Weighted random: each pick independent, probability proportional to weight."""

from __future__ import annotations

from typing import Any, Generator, Mapping, Sequence

from .._types import Endpoint
from ._base import Policy, WeightedSampler, effective_weights, effective_weights_steps


class Random(Policy):
    name = "random"
    ramps_weights = True

    _sampler = WeightedSampler(())

    def update(
        self, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        self._sampler = WeightedSampler(effective_weights(endpoints, weights))

    def prepare_steps(
        self, endpoints: Sequence[Endpoint], weights: Mapping[str, float] | None, chunk: int
    ) -> Generator[int, None, Any]:
        pairs = yield from effective_weights_steps(endpoints, weights, chunk)
        return WeightedSampler(pairs)

    def update_prepared(
        self, prepared: Any, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        self._sampler = prepared

    def pick(self, key: str | None, source: str | None, now: float) -> Endpoint | None:
        return self._sampler.sample(self.rng)
