"""Smooth weighted round robin: exact proportions over every full cycle, interleaved.

nginx's smooth WRR scans every peer on each pick (O(n)). This produces a sequence with the
same guarantees in O(log n): an earliest-deadline-first schedule where an endpoint of
weight w has its k-th pick due at (k - 1/2) / w. Those deadlines are the Sainte-Laguë
(Webster) divisors, so picks are spread evenly rather than bunched at the end of a cycle,
and every window [c, c + 1) of deadlines holds exactly w picks of each endpoint: with integer
weights summing to W, picks c*W .. c*W + W - 1 contain each endpoint exactly w times.
(Deadlines never land on an integer, so no tie straddles a cycle boundary.)

Ties between equal deadlines go to a rotation whose start is random per update, so agents
restarted together do not all begin on the same backend. Updates keep the schedule (see
`update`), so the proportions hold across endpoint changes too, not only between them.
"""

from __future__ import annotations

import math
from heapq import heapify, heapreplace
from typing import Mapping, Sequence

from .._types import Endpoint
from ._base import Policy, effective_weights


class WeightedRoundRobin(Policy):
    name = "weighted_round_robin"
    ramps_weights = True

    # Heap entries: (next deadline, tie rank, picks so far, weight, endpoint). The rank is
    # unique, so comparison never reaches the endpoint.
    _heap: list[tuple[float, int, int, float, Endpoint]] = []
    #: Virtual time: the deadline of the last pick.
    _now = 0.0

    def update(
        self, endpoints: Sequence[Endpoint], now: float, weights: Mapping[str, float] | None = None
    ) -> None:
        # The schedule survives updates: an endpoint whose weight is unchanged keeps its next
        # deadline, and a new or re-weighted one takes its first slot at or after the current
        # virtual time. Restarting everyone from zero on every update (health flaps, another
        # endpoint's slow-start steps) would give the low-weight endpoints' first slots away
        # each time, and they would never be picked.
        pairs = effective_weights(endpoints, weights)
        n = len(pairs)
        start = self.rng.randrange(n) if n else 0
        before = {ep.id: (deadline, k, w) for deadline, _, k, w, ep in self._heap}
        heap = []
        for i, (ep, w) in enumerate(pairs):
            prev = before.get(ep.id)
            if prev is not None and prev[2] == w:
                deadline, k = prev[0], prev[1]
            else:
                k = max(0, math.ceil(self._now * w - 0.5))
                deadline = (k + 0.5) / w
            heap.append((deadline, (i - start) % n, k, w, ep))
        heapify(heap)
        self._heap = heap

    def pick(self, key: str | None, source: str | None, now: float) -> Endpoint | None:
        heap = self._heap
        if not heap:
            return None
        deadline, rank, k, w, ep = heap[0]
        self._now = deadline
        # (k + 1.5) / w: the deadline of the (k+2)-th pick. Floats are exact enough here:
        # equal rationals divide to equal floats, distinct ones stay ordered for any
        # realistic count of picks between two updates.
        heapreplace(heap, ((k + 1.5) / w, rank, k + 1, w, ep))
        return ep
