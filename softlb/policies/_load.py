"""Per-endpoint feedback, kept once per service and read by every view of it.

A service is picked from through several views: its served set, and one per tag filter a
caller asks for. Requests in flight and latency history belong to the endpoint, not to a
view, so they live here once (grpc-go keeps per-SubConn state in the balancer and hands out
pickers that read it). A lease opening or closing updates this board; views that index by
load (the least-loaded heaps) are told which endpoint moved so they can re-rank it.

The board also outlives policy switches: a reload that changes the policy hands the same
board to the new policy, so leases opened before the switch are still counted and close
exactly once.
"""

from __future__ import annotations

import math
import weakref
from typing import Protocol

#: Weight of one report in the service-wide average that stands in for endpoints with no
#: latency history yet.
SERVICE_ALPHA = 0.05
#: Latency decay time constant (seconds) when the policy does not set one.
DEFAULT_DECAY = 10.0


class LoadListener(Protocol):
    def load_changed(self, endpoint_id: str) -> None: ...


class _Latency:
    __slots__ = ("ewma", "stamp")

    def __init__(self, ewma: float, stamp: float) -> None:
        self.ewma = ewma
        self.stamp = stamp


class LoadBoard:
    """Open leases and peak-EWMA latency per endpoint id."""

    __slots__ = ("active", "_latency", "service_latency", "decay", "_listeners", "__weakref__")

    def __init__(self, decay: float = DEFAULT_DECAY) -> None:
        self.active: dict[str, int] = {}
        self._latency: dict[str, _Latency] = {}
        #: The estimate for endpoints with no history (None: nothing reported yet).
        self.service_latency: float | None = None
        self.decay = decay
        # Weak: a view dropped from a cache must not be kept alive (and told) forever.
        self._listeners: weakref.WeakSet[LoadListener] = weakref.WeakSet()

    def listen(self, view: LoadListener) -> None:
        self._listeners.add(view)

    def in_flight(self, endpoint_id: str) -> int:
        return self.active.get(endpoint_id, 0)

    def start(self, endpoint_id: str) -> None:
        self.active[endpoint_id] = self.active.get(endpoint_id, 0) + 1
        self._tell(endpoint_id)

    def finish(self, endpoint_id: str, latency: float | None, now: float) -> None:
        n = self.active.get(endpoint_id, 0) - 1
        if n > 0:
            self.active[endpoint_id] = n
        else:
            # Never below zero: a verdict without a lease (a report naming the endpoint)
            # must not leave a debt that skews later picks.
            self.active.pop(endpoint_id, None)
        if latency is not None and latency >= 0 and not math.isnan(latency):
            self._observe(endpoint_id, latency, now)
        self._tell(endpoint_id)

    def _tell(self, endpoint_id: str) -> None:
        if not self._listeners.data:  # iterating (or len() of) a WeakSet costs Python calls
            return
        for view in self._listeners:
            view.load_changed(endpoint_id)

    # ----------------------------------------------------------------- latency

    def latency(self, endpoint_id: str, now: float) -> float | None:
        """The endpoint's peak-EWMA latency decayed to `now`; None without history."""
        st = self._latency.get(endpoint_id)
        if st is None:
            return None
        dt = now - st.stamp
        return st.ewma * math.exp(-dt / self.decay) if dt > 0 else st.ewma

    def _observe(self, endpoint_id: str, latency: float, now: float) -> None:
        avg = self.service_latency
        self.service_latency = latency if avg is None else avg + SERVICE_ALPHA * (latency - avg)
        st = self._latency.get(endpoint_id)
        if st is None:
            self._latency[endpoint_id] = _Latency(latency, now)
            return
        # Peak EWMA (Finagle): a sample above the decayed estimate replaces it at once; below
        # it, it adds its share (1 - w), so a steady stream of samples r converges to r.
        w = math.exp(-max(now - st.stamp, 0.0) / self.decay)
        decayed = st.ewma * w
        st.ewma = latency if latency > decayed else decayed + latency * (1.0 - w)
        st.stamp = max(st.stamp, now)

    def forget(self, members: set[str]) -> None:
        """Drop history of endpoints that left the catalog (if they return, old numbers would
        describe a process that has since restarted) and idle counters; counts of leases
        still open on departed endpoints stay until those leases close."""
        for eid in [eid for eid in self._latency if eid not in members]:
            del self._latency[eid]
        for eid in [eid for eid, n in self.active.items() if n <= 0 and eid not in members]:
            del self.active[eid]
