"""Least request: power of two choices over peak-EWMA latency (Finagle's, as Envoy adopts).

Each pick draws two distinct endpoints at random, with probability proportional to weight,
and takes the cheaper, where

    cost = peak_ewma_latency * (open leases + 1)

Weights act through the draw, not the cost: with equal costs (an idle, uniform service) the
first draw wins, so shares follow weights exactly; dividing the cost by the weight instead
would hand every idle pick to the heaviest endpoint of the pair.

Two random choices instead of the global minimum keep picks O(log n) and, more importantly,
avoid herding: every agent on every host computing the same global minimum would all pile
onto the same backend between reports.

Peak EWMA (Finagle's PeakEwma): a latency above the current estimate replaces it at once, so
a backend that turns slow is avoided immediately; below it, the estimate decays toward the
new sample with time constant `decay` seconds. The estimate also decays toward zero while no
reports arrive, so a backend that was slow gets a fresh trial after a while instead of
being shunned forever on old evidence.

An endpoint with no reports yet is assumed to be as fast as the service's recent average
(a per-sample EWMA over all reports, so simultaneous reports all count); Finagle's choice of zero would send a burst to every
newcomer, and slow start is the tool for warming newcomers up gently.

Failed results count like any other sample: a backend that fails fast looks fast here, and
is removed by health checks and outlier ejection, which run before the policy sees the set.
"""

from __future__ import annotations

import random
from typing import Mapping

from .._types import Endpoint
from ._base import SampledPolicy
from ._load import LoadBoard

#: How many draws to spend finding a second endpoint distinct from the first before
#: settling for one candidate (only a heavily dominant weight makes repeats likely).
_DISTINCT_TRIES = 4


class LeastRequest(SampledPolicy):
    name = "least_request"
    ramps_weights = True
    OPTIONS = {"decay": 10.0, "choices": 2}

    def __init__(self, *, rng: random.Random, options: Mapping[str, object] | None = None,
                 load: LoadBoard | None = None) -> None:
        super().__init__(rng=rng, options=options, load=load)
        self.load.decay = float(self.options["decay"])
        self._choices = int(self.options["choices"])

    def pick(self, key: str | None, source: str | None, now: float) -> Endpoint | None:
        sampler = self._sampler
        n = len(sampler)
        if n <= 1:
            return sampler.sample(self.rng)
        best = sampler.index(self.rng)
        best_cost = self._cost(best, now)
        for _ in range(self._choices - 1):
            other = best
            for _ in range(_DISTINCT_TRIES):
                other = sampler.index(self.rng)
                if other != best:
                    break
            cost = self._cost(other, now)
            if cost < best_cost:
                best, best_cost = other, cost
        return sampler.endpoints[best]

    def _cost(self, i: int, now: float) -> float:
        load = self.load
        eid = self._sampler.endpoints[i].id
        latency = load.latency(eid, now)
        if latency is None:
            latency = load.service_latency
            if latency is None:
                latency = 1.0  # nothing reported anywhere yet: compare on open leases alone
        return latency * (load.in_flight(eid) + 1)
