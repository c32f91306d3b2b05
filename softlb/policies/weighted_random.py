"""Weighted random: each pick independent, probability proportional to weight."""

from __future__ import annotations

from typing import Mapping, Sequence

from .._types import Endpoint
from ._base import Policy, WeightedSampler, effective_weights


class Random(Policy):
    name = "random"
    ramps_weights = True

    _sampler = WeightedSampler(())

    def update(
        self, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        self._sampler = WeightedSampler(effective_weights(endpoints, weights))

    def pick(self, key: str | None, source: str | None, now: float) -> Endpoint | None:
        return self._sampler.sample(self.rng)
