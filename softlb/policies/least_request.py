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

import math
import random
from typing import Mapping, Sequence

from .._types import Endpoint
from ._base import Policy, WeightedSampler, effective_weights, forget_idle, lease_closed, lease_opened

#: Weight of one report in the service-wide average that stands in for cold endpoints.
_SERVICE_ALPHA = 0.05

#: How many draws to spend finding a second endpoint distinct from the first before
#: settling for one candidate (only a heavily dominant weight makes repeats likely).
_DISTINCT_TRIES = 4


class _Stats:
    __slots__ = ("ewma", "stamp")

    def __init__(self, ewma: float, stamp: float) -> None:
        self.ewma = ewma
        self.stamp = stamp


class LeastRequest(Policy):
    name = "least_request"
    ramps_weights = True
    OPTIONS = {"decay": 10.0, "choices": 2}

    def __init__(self, *, rng: random.Random, options: Mapping[str, object] | None = None) -> None:
        super().__init__(rng=rng, options=options)
        self._decay = float(self.options["decay"])
        self._choices = int(self.options["choices"])
        self.active: dict[str, int] = {}
        self._stats: dict[str, _Stats] = {}
        self._sampler = WeightedSampler(())
        self._service_latency: float | None = None  # the estimate for cold endpoints

    def update(
        self, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        pairs = effective_weights(endpoints, weights)
        self._sampler = WeightedSampler(pairs)
        ids = {ep.id for ep, _ in pairs}
        # Forget latency history of endpoints that left: if they return, old numbers would
        # describe a process that has since restarted.
        for eid in [eid for eid in self._stats if eid not in ids]:
            del self._stats[eid]
        forget_idle(self.active, ids)

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
        eid = self._sampler.endpoints[i].id
        st = self._stats.get(eid)
        if st is not None:
            latency = self._latency(st, now)
        elif self._service_latency is not None:
            latency = self._service_latency
        else:
            latency = 1.0  # nothing reported anywhere yet: compare on open leases alone
        return latency * (self.active.get(eid, 0) + 1)

    def _latency(self, st: _Stats, now: float) -> float:
        dt = now - st.stamp
        return st.ewma * math.exp(-dt / self._decay) if dt > 0 else st.ewma

    def inherit(self, other: Policy) -> None:
        if isinstance(other, LeastRequest):
            self.active = dict(other.active)
            # Copies: both instances hear every report, and shared objects would apply
            # each one twice.
            self._stats = {eid: _Stats(st.ewma, st.stamp) for eid, st in other._stats.items()}
            self._service_latency = other._service_latency

    def on_start(self, endpoint_id: str, now: float) -> None:
        lease_opened(self.active, endpoint_id)

    def on_finish(self, endpoint_id: str, ok: bool, latency: float | None, now: float) -> None:
        lease_closed(self.active, endpoint_id)
        if latency is None or latency < 0 or math.isnan(latency):
            return
        avg = self._service_latency
        self._service_latency = latency if avg is None else avg + _SERVICE_ALPHA * (latency - avg)
        st = self._stats.get(endpoint_id)
        if st is None:
            self._stats[endpoint_id] = _Stats(latency, now)
        else:
            self._observe(st, latency, now)

    def _observe(self, st: _Stats, latency: float, now: float) -> None:
        # The stored value decays toward zero while time passes (see _latency); a sample
        # adds its share (1 - w) on top of the decayed value, so a steady stream of
        # samples r converges to r.
        w = math.exp(-max(now - st.stamp, 0.0) / self._decay)
        decayed = st.ewma * w
        st.ewma = latency if latency > decayed else decayed + latency * (1.0 - w)
        st.stamp = max(st.stamp, now)
