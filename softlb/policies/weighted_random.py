"""Weighted random: each pick independent, probability proportional to weight."""

from __future__ import annotations

from .._types import Endpoint
from ._base import SampledPolicy


class Random(SampledPolicy):
    name = "random"
    ramps_weights = True

    def pick(self, key: str | None, source: str | None, now: float) -> Endpoint | None:
        return self._sampler.sample(self.rng)
