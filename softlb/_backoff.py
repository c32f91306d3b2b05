"""Retry delays as a value: capped exponential backoff with jitter, reset on success.

Consul's own watch loop retries after `5s x failures^2` capped at 180 s. We keep its two
essentials (grow fast, cap, reset after the first success) but double from a smaller base
so a blip costs a second, not five, and add jitter so a fleet of agents that lost Consul
together does not come back in lockstep. The delay for failure n (1-based) is drawn
uniformly from [d/2, d] with d = min(cap, base * 2**(n-1)): never below half the nominal
delay (so the request rate is bounded), never above the cap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: Defaults for Consul watches. 1 s base: recover quickly from a restart of the local agent.
#: 60 s cap: a 500ing Consul costs ~1-2 requests a minute per watch, and an agent notices
#: Consul's return within a minute (Consul's 180 s cap is long for a load balancer).
DEFAULT_BASE = 1.0
DEFAULT_CAP = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    base: float = DEFAULT_BASE
    cap: float = DEFAULT_CAP

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={self.base} cap={self.cap}")

    def nominal(self, failures: int) -> float:
        """The un-jittered delay after `failures` consecutive failures (>= 1)."""
        if failures < 1:
            return 0.0
        # Cap the exponent first: 2**10000 is a valid int but an overflowing float.
        exp = min(failures - 1, 62)
        return min(self.cap, self.base * (2.0**exp))

    def delay(self, failures: int, rng: random.Random) -> float:
        d = self.nominal(failures)
        return rng.uniform(d / 2, d) if d else 0.0


class Backoff:
    """One retry loop's state: count failures, hand out delays, forget on success."""

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self.failures = 0

    def failure(self) -> float:
        """Record a failure; the delay before the next attempt."""
        self.failures += 1
        return self.policy.delay(self.failures, self.rng)

    def success(self) -> None:
        self.failures = 0
