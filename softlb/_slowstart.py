"""Slow start: a new or returning endpoint's weight ramps up over a window.

A backend that just started (cold caches, JIT, connection pools) or just came back from an
ejection would otherwise get its full share at once and often fall over again. During the
window its effective weight is `weight * slow_start_factor(...)`, Envoy's curve:

    factor = max(min_factor, (elapsed / window) ** (1 / aggression))

aggression 1 is a straight line; above 1 the ramp rises faster early on. The floor keeps
a brand-new endpoint from getting no traffic at all (and so never warming up).

"New or returning" means: not in the eligible set at the previous observation. The very
first observation of a service treats everything as warm -- when every endpoint would ramp
together the ramp changes nothing but would still cost refreshes.

Only policies that balance by weight can ramp (see `Policy.ramps_weights`); round robin and
the consistent-hash policies ignore slow start.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from ._types import Endpoint

#: Effective weights are recomputed this many times over a window: 5% steps are smooth
#: enough, and each recomputation rebuilds the policy's O(n) state.
REFRESH_STEPS = 20
DEFAULT_MIN_FACTOR = 0.1


def slow_start_factor(
    elapsed: float, window: float, aggression: float = 1.0, min_factor: float = DEFAULT_MIN_FACTOR
) -> float:
    """The fraction of its weight an endpoint gets `elapsed` seconds into its ramp."""
    if window <= 0 or elapsed >= window:
        return 1.0
    if elapsed <= 0:
        return min_factor
    return max(min_factor, (elapsed / window) ** (1.0 / aggression))


class SlowStart:
    """Tracks when each endpoint became eligible, and the effective weights that follow."""

    def __init__(
        self, window: float, *, aggression: float = 1.0, min_factor: float = DEFAULT_MIN_FACTOR
    ) -> None:
        if aggression <= 0 or not 0 < min_factor <= 1:
            raise ValueError("aggression must be positive and min_factor in (0, 1]")
        self.window = window
        self.aggression = aggression
        self.min_factor = min_factor
        self._since: dict[str, float] = {}  # endpoint id -> when it (re)joined the eligible set
        self._seen_any = False

    def observe(self, endpoint_ids: Iterable[str], now: float) -> None:
        """Record the current eligible set; ids not in it lose their history."""
        ids = set(endpoint_ids)
        since = self._since
        start = now if self._seen_any else float("-inf")
        self._seen_any = True
        self._since = {eid: since.get(eid, start) for eid in ids}

    def ramping(self, now: float) -> bool:
        return any(now - t < self.window for t in self._since.values())

    def weights(self, endpoints: Sequence[Endpoint], now: float) -> dict[str, float] | None:
        """Effective weights of ramping endpoints (others keep their own); None if none ramp."""
        if self.window <= 0:
            return None
        out = {}
        for ep in endpoints:
            t = self._since.get(ep.id)
            if t is not None and now - t < self.window:
                out[ep.id] = ep.weight * slow_start_factor(now - t, self.window, self.aggression, self.min_factor)
        return out or None

    def next_refresh(self, now: float) -> float | None:
        """When effective weights should next be recomputed; None once nobody ramps."""
        if self.window <= 0:
            return None
        ends = [t + self.window for t in self._since.values() if now - t < self.window]
        if not ends:
            return None
        return min(min(ends), now + self.window / REFRESH_STEPS)
